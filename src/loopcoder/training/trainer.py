"""The training loop, the same for pretraining and SFT: a model, a `BatchSource`, a config.

One optimizer step (`train_step`): the global batch arrives as micro-batches; each micro-batch's
summed next-token loss is divided by the number of target tokens in the whole global batch (all
ranks), so the gradient is that of the global mean loss whatever the split into ranks and
micro-batches (SFT batches have different numbers of labelled tokens). Then clip, check that the
loss and gradient norm are finite, step the optimizer and the LR schedule.

Around it (`fit`): metrics, progress, validation every `eval.every` steps, a checkpoint every
`checkpoint.every` steps and at the end, exact resume from a checkpoint's state.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loopcoder.data.sft import IGNORE_INDEX
from loopcoder.model import lora
from loopcoder.training import checkpoints as ckpt
from loopcoder.training import distributed as D
from loopcoder.training.config import TrainConfig
from loopcoder.training.data import BatchSource
from loopcoder.training.flops import mfu, peak_flops, train_flops_per_token
from loopcoder.training.metrics import MetricsLogger
from loopcoder.training.optim import build_optimizer, build_scheduler
from loopcoder.training.plots import write_run_curves
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress
from loopcoder.utils.runtime import pick_dtype

STATE_FORMAT = 1
KILL_ENV = "LOOPCODER_TEST_KILL_AFTER_STEP"  # tests only: SIGKILL this process after that step


class NonFiniteLoss(LoopcoderError):
    """The loss or the gradient norm is NaN or infinite: the run stops, checkpoints stay as they are."""


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path  # a model directory (released layout + tokenizer + trainer state)
    step: int
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    tokens: int  # tokens trained on (all ranks), since step 0
    train_s: float  # time in training steps of this trajectory (resumed sessions summed; no eval/saving)
    metrics: list[dict[str, Any]]  # every record of metrics.jsonl


# ----------------------------------------------------------------------------- RNG state
def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the process uses, as plain tensors and Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _reader_state_for(reader: Any, saved: dict[str, int]) -> dict[str, int]:
    """A saved reader position, translated to this reader's layout (a different world size or
    micro-batch at the same global batch): the same rows consumed so far."""
    g_saved = saved["batch_size"] * saved["world_size"]
    g_now = reader.batch_size * reader.world_size
    rows = saved["step"] * g_saved
    if rows % g_now:
        raise LoopcoderError(
            f"cannot resume: the checkpoint's data position ({rows} rows into epoch "
            f"{saved['epoch']}) is not a whole number of batches of {g_now} rows"
        )
    return {**saved, "step": rows // g_now, "batch_size": reader.batch_size, "world_size": reader.world_size}


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        source: BatchSource,
        env: D.DistEnv,
        state: dict[str, Any] | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.source = source
        self.run_dir = Path(run_dir or cfg.out)
        self.micro_batch, self.accum = cfg.accumulation(env.world_size)
        self.model_config = model.config
        device = env.device
        self.bf16 = pick_dtype(cfg.train.precision, device) is torch.bfloat16
        self.strategy = D.strategy(cfg, env)

        model.to(device).train()
        if cfg.train.activation_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        if cfg.train.compile:
            for layer in model.model.layers:
                layer.compile()  # in place: parameter names (and so checkpoints) do not change
        self.module = model
        self.model = D.wrap(model, cfg, env, self.bf16)
        # FSDP2 computes in bf16 through its mixed-precision policy; elsewhere autocast does
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if self.bf16 and self.strategy != "fsdp"
            else contextlib.nullcontext()
        )
        self.optimizer = build_optimizer(self.module, cfg, device)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.reader = source.reader(self.micro_batch, cfg.seed, env.rank, env.world_size)

        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # seconds in training steps, resumed sessions included
        self._window = [0, 0.0]  # tokens and seconds of training steps since the last train record
        self._curves_drawn = -1  # how many records RUN/curves.png shows
        history: list[dict[str, Any]] = []
        if state is not None:
            self._load_state(state)
            history = list(state.get("metrics", []))
        self.metrics = MetricsLogger(self.run_dir, env.is_main, cfg.logging.tensorboard, history, self.step)
        self.progress = Progress(
            "train",
            cfg.train.steps,
            "steps",
            amount_unit="tokens",
            start=self.step,
            mode=cfg.logging.progress if env.is_main else "off",
            every_s=cfg.logging.progress_every_s,
        )
        self.tokens_per_step = cfg.train.global_batch_size * source.seq_len
        self.flops_per_token = train_flops_per_token(self.model_config, source.seq_len)["total"]
        peak = cfg.logging.peak_flops
        if peak is None and device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(device))
        self.peak = peak

    # -- one optimizer step ------------------------------------------------------------------------
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss of one micro-batch (fp32): `causal_lm_loss`, but the logits of the
        last position (which predicts nothing) are never computed, so no vocabulary-sized slice is
        copied forward and backward."""
        dev = self.env.device
        ids = batch["input_ids"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        mask = batch.get("attention_mask")
        if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
            # Right padding only: under causal attention no real token sees a pad, and pads carry no
            # labels, so the loss is the same without the mask, and the model keeps its fast mask path.
            mask = None
        keep = torch.arange(ids.shape[1] - 1, device=dev)
        with self.autocast:
            logits = self.model(
                input_ids=ids,
                attention_mask=None if mask is None else mask.to(dev),
                use_cache=False,
                logits_to_keep=keep,
            ).logits
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, float]:
        """Forward/backward over the micro-batches, clip, step. Returns (global mean loss, grad norm, the
        LR this step used)."""
        env = self.env
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        n = D.all_reduce_sum(torch.tensor(float(local_targets), dtype=torch.float64, device=env.device), env)
        scale = env.world_size / max(float(n), 1.0)  # ranks' gradients are averaged: undo the 1/W
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = self.model.no_sync() if self.strategy == "ddp" and not last else contextlib.nullcontext()
            with sync:
                loss = self._forward_loss(batch)
                (loss * scale).backward()
            loss_sum += loss.detach().double()
        clip = self.cfg.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        mean_loss = float(D.all_reduce_sum(loss_sum, env) / max(float(n), 1.0))
        grad_norm = float(norm)
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss {mean_loss} / grad norm {grad_norm}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm, lr

    # -- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Mean next-token loss and bits per byte on the validation split (all ranks together)."""
        if self.source.validation is None:
            return None
        self.model.eval()
        env = self.env
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # nll (nats), tokens, bytes
        bs = self.cfg.eval.batch_size or self.micro_batch
        for batch in self.source.validation_batches(bs, env.rank, env.world_size, self.cfg.eval.max_batches):
            sums[0] += self._forward_loss(batch).double()
            sums[1] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            sums[2] += self.source.label_bytes(batch["labels"])
        self.model.train()
        nll, tokens, nbytes = D.all_reduce_sum(sums, env).tolist()
        return {
            "kind": "val",
            "step": self.step,
            "val_loss": nll / max(tokens, 1.0),
            "val_bpb": nll / math.log(2) / max(nbytes, 1.0),
            "val_tokens": int(tokens),
            "val_bytes": int(nbytes),
        }

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights (collective: every rank must call it)."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
            "optimizer": D.full_optimizer_state(self.module, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "reader": self.reader.state_dict(),
            "rng": D.gather_objects(rng_state(self.env.device), self.env),
            "metrics": list(self.metrics.records),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise LoopcoderError(f"trainer state format {state.get('format')!r} is not {STATE_FORMAT}")
        D.load_optimizer_state(self.module, self.optimizer, state["optimizer"], self.env)
        self.scheduler.load_state_dict(state["scheduler"])
        self.reader.load_state_dict(_reader_state_for(self.reader, state["reader"]))
        rngs = state["rng"]
        same_layout = len(rngs) == self.env.world_size
        if same_layout:
            set_rng_state(rngs[self.env.rank], self.env.device)
        else:  # a different world size: the ranks' streams cannot map one to one; reseed them
            seed_everything(self.cfg.seed + 1000003 * state["step"] + self.env.rank)
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.elapsed = float(state["elapsed_s"])

    def save_checkpoint(self) -> Path:
        adapter = self.module.peft_config["default"] if lora.is_attached(self.module) else None
        weights = D.full_model_state(self.module, self.env, trainable_only=adapter is not None)
        state = self.state_dict()
        path = None
        if self.env.is_main:
            info = {"tokens": self.tokens, "world_size": self.env.world_size, "stage": self.cfg.stage}
            path = ckpt.write_checkpoint(
                self.run_dir,
                self.step,
                self.model_config,
                weights,
                state,
                self.source.tokenizer_dir,
                self.cfg.checkpoint.keep,
                self.cfg.checkpoint.max_shard_size,
                info,
                adapter,
            )
        path = D.broadcast_object(str(path) if path else None, self.env)
        D.barrier(self.env)
        return Path(path)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to `train.steps`: step, log, validate and checkpoint on schedule. Returns the result."""
        cfg = self.cfg
        records = self.metrics.records
        last_loss = next((r["loss"] for r in reversed(records) if r["kind"] == "train"), None)
        last_val = next((r for r in reversed(records) if r["kind"] == "val"), None)
        final = ckpt.latest_checkpoint(self.run_dir) if self.step >= cfg.train.steps else None
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                batches = [self.reader.next_batch() for _ in range(self.accum)]
                try:
                    last_loss, grad_norm, lr = self.train_step(batches)
                except NonFiniteLoss as e:
                    raise self._non_finite(str(e)) from None
                seconds = time.perf_counter() - t0
                self.step += 1
                self.tokens += self.tokens_per_step
                self.elapsed += seconds
                done = self.step == cfg.train.steps
                self._record_step(last_loss, grad_norm, lr, seconds, done)
                if (cfg.eval.every and self.step % cfg.eval.every == 0 and not done) or (done and cfg.eval.at_end):
                    last_val = self._log_validation() or last_val
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or done:
                    final = self.save_checkpoint()
                    self.progress.message(f"checkpoint {final}")
                if kill_at and self.step == kill_at:  # tests: die like a preempted job, mid-run
                    os.kill(os.getpid(), signal.SIGKILL)
            self._write_curves()
        finally:
            self.progress.close()
            self.metrics.close()
        return TrainResult(
            self.run_dir,
            final,
            self.step,
            last_loss,
            last_val["val_loss"] if last_val else None,
            last_val["val_bpb"] if last_val else None,
            self.tokens,
            self.elapsed,
            list(self.metrics.records),
        )

    def _record_step(self, loss: float, grad_norm: float, lr: float, seconds: float, done: bool) -> None:
        """A train record every `logging.every` steps; tokens/s over the steps since the last one."""
        self._window[0] += self.tokens_per_step
        self._window[1] += seconds
        if self.step % self.cfg.logging.every and not done:
            return
        tps = self._window[0] / max(self._window[1], 1e-9)
        self._window = [0, 0.0]
        record = {
            "kind": "train",
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": tps,
            "elapsed_s": self.elapsed,
        }
        util = mfu(self.flops_per_token, tps, self.peak, self.env.world_size)
        if util is not None:
            record["mfu"] = util
        self.metrics.log(record)
        info = f"loss {loss:.4f}" + (f", MFU {util:.1%}" if util is not None else "")
        self.progress.update(self.step, self.tokens, rate=tps, info=info, force=done)

    def _log_validation(self) -> dict[str, Any] | None:
        t = time.perf_counter()
        val = self.validate()
        if val is not None:
            self.metrics.log(val)
            self.progress.message(
                f"step {self.step}: val loss {val['val_loss']:.4f}, {val['val_bpb']:.4f} bits/byte "
                f"({time.perf_counter() - t:.1f} s)"
            )
            self._write_curves()
        return val

    def _write_curves(self) -> None:
        """RUN/curves.png (rank 0). A plot that cannot be written costs the run nothing but a message."""
        if not (self.env.is_main and self.cfg.logging.curves) or self._curves_drawn == len(self.metrics.records):
            return
        self._curves_drawn = len(self.metrics.records)
        try:
            write_run_curves(self.run_dir, self.metrics.records)
        except OSError as e:
            self.progress.message(f"could not write {self.run_dir}/curves.png: {e}")

    def _non_finite(self, what: str) -> NonFiniteLoss:
        good = ckpt.latest_checkpoint(self.run_dir)
        keep = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        msg = (
            f"non-finite training loss at step {self.step + 1} ({what}): stopped; {keep}. Lower optim.lr, "
            "raise schedule.warmup_fraction or check the data, then resume"
        )
        self.metrics.log({"kind": "error", "step": self.step + 1, "error": msg})
        return NonFiniteLoss(msg)
