"""The training state and how it is made: the TrainState pytree (params, optimizer state, batch-norm
statistics, dropout key, and optionally a moving average of the weights), the optimizer, and a fresh or
abstract state for a model. Pure functions of their arguments; no I/O."""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from imgclf_jax import parallel, xla_cpu


class TrainState(train_state.TrainState):
    """Params, optimizer state and step (from flax), plus batch-norm statistics and the dropout key."""

    batch_stats: Any
    dropout_key: jax.Array


class EmaTrainState(TrainState):
    """A TrainState that also keeps an exponential moving average of the weights and batch-norm statistics
    (`config.ema_decay` > 0): {"params": ..., "batch_stats": ...}. A subclass, so that runs without it keep
    the checkpoint layout they always had."""

    ema: Any


def eval_variables(state: TrainState) -> dict[str, Any]:
    """The variables to evaluate and predict with: the weights' moving average where the run keeps one."""
    if isinstance(state, EmaTrainState):
        return dict(state.ema)
    return {"params": state.params, "batch_stats": state.batch_stats}


def update_ema(state: EmaTrainState, decay: float) -> EmaTrainState:
    """Moves the average of params and batch statistics towards the current ones. The effective decay
    starts low, min(decay, (1 + step) / (10 + step)) as in tf.train.ExponentialMovingAverage, so early
    averages do not keep the random initialisation."""
    step = state.step.astype(jnp.float32)
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    current = {"params": state.params, "batch_stats": state.batch_stats}
    ema = jax.tree_util.tree_map(lambda avg, x: rate * avg + (1.0 - rate) * x, dict(state.ema), current)
    return state.replace(ema=ema)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule):
    """Adam, or AdamW if weight_decay > 0; or SGD with Nesterov momentum and an L2 term. Weight decay never
    applies to biases and norm scales (1-d parameters)."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    if config.optimizer == "sgd":
        sgd = optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.momentum > 0)
        if config.weight_decay > 0:
            return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask), sgd)
        return sgd
    if config.weight_decay > 0:
        return optax.adamw(learning_rate_fn, weight_decay=config.weight_decay, mask=decay_mask)
    return optax.adam(learning_rate_fn)


def create_train_state(
    model: flax.linen.Module,
    image_size: int,
    optimizer: optax.GradientTransformation,
    seed: int,
    mesh: Optional[jax.sharding.Mesh] = None,
    ema: bool = False,
) -> TrainState:
    """A fresh state from `seed`; with a `mesh`, replicated on every device of it; with `ema`, keeping a
    moving average of the weights (which starts as a copy of them)."""
    create = functools.partial(_initial_state, model, image_size, optimizer, seed, ema)
    return jax.jit(create, out_shardings=parallel.replicated(mesh) if mesh is not None else None,
                   compiler_options=xla_cpu.one_off_compiler_options())()


def abstract_train_state(
    model: flax.linen.Module, image_size: int, optimizer: optax.GradientTransformation, ema: bool = False,
) -> TrainState:
    """The state's structure, shapes and dtypes without computing it: a restore target (nothing compiled)."""
    return jax.eval_shape(functools.partial(_initial_state, model, image_size, optimizer, 0, ema))


def _initial_state(model: flax.linen.Module, image_size: int, optimizer: optax.GradientTransformation,
                   seed: int, ema: bool = False) -> TrainState:
    params_key, dropout_key = jax.random.split(jax.random.key(seed))
    variables = model.init(params_key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    fields = dict(apply_fn=model.apply, params=variables["params"], tx=optimizer,
                  batch_stats=variables.get("batch_stats", {}), dropout_key=jax.random.key_data(dropout_key))
    if ema:
        return EmaTrainState.create(**fields, ema={"params": fields["params"], "batch_stats": fields["batch_stats"]})
    return TrainState.create(**fields)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every number in the pytree `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
