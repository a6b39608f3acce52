"""Training loops for the shipped model pair: a target from text, a draft distilled from it.

Each stage checkpoints into its own folder (weights in Hugging Face format, optimizer
state as safetensors, the step in state.json) and resumes from there when run again, so a
long run survives being stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from specjax.cache import init_cache
from specjax.checkpoint import load, save
from specjax.model import Model, forward


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.1
    save_every: int = 100
    log_every: int = 10


def _positions(batch: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def model_logits(model_graph, params, config, tokens: jax.Array) -> jax.Array:
    """Logits (B, T, V) of a full causal forward over tokens (B, T) from position 0."""
    batch, length = tokens.shape
    cache = init_cache(config, batch, length, jnp.float32)
    logits, _ = forward(model_graph, params, tokens, _positions(batch, length), cache)
    return logits


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Mean KL(teacher || student) per token, the forward KL that rewards covering the teacher."""
    teacher_log_probs = jax.nn.log_softmax(teacher_logits, axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return jnp.mean(kl)


def make_optimizer(schedule: Schedule) -> optax.GradientTransformation:
    lr = optax.warmup_cosine_decay_schedule(
        0.0, schedule.lr, schedule.warmup, max(schedule.steps, schedule.warmup + 1), schedule.lr * 0.1
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim == 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=schedule.weight_decay, mask=decay_mask),
    )


def _save_state(folder: Path, model: Model, opt_state, step: int, history: list) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    save(model, tmp / "model")
    leaves = jax.tree.leaves(opt_state)
    save_file({f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}) + "\n")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        for file in sorted(old.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        old.rmdir()
    else:
        tmp.rename(folder)


def _resume(folder: Path, model: Model, opt_state):
    if not (folder / "state.json").is_file():
        return model, opt_state, 0, []
    state = json.loads((folder / "state.json").read_text())
    loaded = load(folder / "model", dtype="float32")
    model = dataclasses.replace(model, params=loaded.params)
    stored = load_file(str(folder / "optimizer.safetensors"))
    treedef = jax.tree.structure(opt_state)
    leaves = [jnp.asarray(stored[f"leaf_{i:05d}"]) for i in range(treedef.num_leaves)]
    print(f"resuming {folder} at step {state['step']}", flush=True)
    return model, jax.tree.unflatten(treedef, leaves), state["step"], state["history"]


def run_stage(
    folder: Path,
    model: Model,
    schedule: Schedule,
    stream: np.ndarray,
    evaluate,
    teacher: Model | None = None,
    seed: int = 0,
) -> Model:
    """Train `model` on `stream`, from scratch or from the checkpoint in `folder`.

    With `teacher`, the loss is the KL divergence to the teacher's next-token
    distribution (distillation); without, it is next-token cross-entropy.
    `evaluate(model)` returns a dict of held-out metrics, logged at each checkpoint.
    """
    optimizer = make_optimizer(schedule)
    opt_state = optimizer.init(model.params)
    model, opt_state, start, history = _resume(folder, model, opt_state)
    graph, config = model.graphdef, model.config

    def loss_fn(params, windows):
        logits = model_logits(graph, params, config, windows[:, :-1])
        if teacher is None:
            return cross_entropy(logits, windows[:, 1:])
        teacher_logits = model_logits(teacher.graphdef, teacher.params, teacher.config, windows[:, :-1])
        return distill_kl(logits, jax.lax.stop_gradient(teacher_logits))

    @jax.jit
    def step_fn(params, opt_state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.params
    rng = np.random.default_rng(seed + start)
    tokens_per_step = schedule.batch * schedule.seq_len
    started, losses = time.perf_counter(), []
    for step in range(start + 1, schedule.steps + 1):
        windows = jnp.asarray(sample_windows_fn(stream, schedule, rng))
        params, opt_state, loss = step_fn(params, opt_state, windows)
        losses.append(float(loss))
        done = step - start
        if step % schedule.log_every == 0 or step == schedule.steps:
            rate = done * tokens_per_step / (time.perf_counter() - started)
            eta = (schedule.steps - step) * tokens_per_step / rate / 60
            print(
                f"{folder.name} step {step}/{schedule.steps} loss {np.mean(losses[-schedule.log_every:]):.4f} "
                f"{rate:.0f} tokens/s, {eta:.1f} min left",
                flush=True,
            )
        if step % schedule.save_every == 0 or step == schedule.steps:
            model = dataclasses.replace(model, params=params)
            metrics = {"step": step, "train_loss": float(np.mean(losses[-schedule.save_every:]))}
            metrics.update(evaluate(model))
            history.append(metrics)
            print(f"{folder.name} checkpoint {json.dumps(metrics)}", flush=True)
            _save_state(folder, model, opt_state, step, history)
    return dataclasses.replace(model, params=params)


def sample_windows_fn(stream: np.ndarray, schedule: Schedule, rng: np.random.Generator) -> np.ndarray:
    from specjax.corpus import sample_windows

    return sample_windows(stream, schedule.batch, schedule.seq_len, rng)
