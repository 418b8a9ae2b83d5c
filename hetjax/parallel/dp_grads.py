"""A stage's data-parallel gradient reduction: fp32 (implicit) or compressed (--config.dp.grad_bits).

fp32 (bits 0): the stage's backward is jitted over its (dp, tp) mesh with batch-sharded inputs and
outputs laid out like the parameters, so XLA all-reduces each micro-batch's gradient over 'dp'
(pipeline.py, unchanged).

Compressed (bits 2, 4, 8): the backward is vmapped over the replicas (the mesh's rows), so each
replica keeps its own gradient, laid out (dp, *param) and sharded P('dp', *param spec): no DP
traffic. The loss of each replica's rows is scaled by 1/dp, so replica gradients sum to the whole
batch's and the activation gradients sent upstream are today's. After the step's last micro-batch,
`reduce_program` runs compression.grad.compressed_mean in a shard_map over the whole mesh: each
device quantizes its replica's TP shard plus its error memory in buckets, the uint8 codes and bf16
scales are all-gathered over 'dp' (across processes when the replicas live on different hosts),
and every replica decodes and sums them. The error memory (same layout) is per-stage run state,
checkpointed under extra/dp_error by the trainer.

This compresses the gradient itself, with one error memory per worker (the issue's build list);
it is not the AQ-SGD code's compressed Adam moment with two-level feedback.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from hetjax.compression import grad as gradc

BUCKET = 512  # values per scale (kernels/README.md, "Choosing a scheme")


def _rows(a, dp: int):
  """(n, ...) -> (dp, n / dp, ...): replica r's rows (the batch sharding's r-th block) in row r."""
  return a.reshape(dp, a.shape[0] // dp, *a.shape[1:])


def _merge(a):
  return None if a is None else a.reshape(-1, *a.shape[2:])


def per_replica_backward(backward, dp: int):
  """backward(params, x, g_out) -> (grads, g_in), made per replica: grads (dp, *param)."""
  def run(params, x, g_out):
    grads, g_in = jax.vmap(lambda a, b: backward(params, a, b), spmd_axis_name='dp')(
        _rows(x, dp), _rows(g_out, dp))
    return grads, _merge(g_in)
  return run


def per_replica_loss_backward(loss_backward, dp: int):
  """loss_backward(params, x, targets, scale) -> (loss, grads, g_in), per replica with the loss
  scaled by 1/dp; returns the summed loss (the micro-batch's mean), grads (dp, *param), g_in."""
  def run(params, x, targets):
    loss, grads, g_in = jax.vmap(lambda a, b: loss_backward(params, a, b, 1.0 / dp),
                                 spmd_axis_name='dp')(_rows(x, dp), _rows(targets, dp))
    return loss.sum(), grads, _merge(g_in)
  return run


def replica_shardings(group):
  """Per-replica gradients and error memory: the parameter's layout behind a leading 'dp' axis."""
  return jax.tree.map(lambda s: NamedSharding(group.mesh, P('dp', *s.spec)), group.param_sharding)


def zero_error_program(group):
  return jax.jit(lambda params: jax.tree.map(lambda a: jnp.zeros((group.dp,) + a.shape, jnp.float32),
                                             params), out_shardings=replica_shardings(group))


def reduce_program(group, bits: int, bucket: int = BUCKET):
  """(grads (dp, *param), error) -> (sum over replicas of their compressed gradients, laid out
  like the parameters, and the new error memory). Each device sends its payload for real."""
  gradc.check(bits, bucket)
  specs = jax.tree.map(lambda s: s.spec, group.param_sharding)
  rows = jax.tree.map(lambda s: P('dp', *s), specs)
  dp = group.dp

  def body(grads, error):
    mine = lambda t: jax.tree.map(lambda a: a[0], t)
    mean, new_error = gradc.compressed_mean(mine(grads), mine(error), 'dp', bits, bucket)
    return jax.tree.map(lambda m: m * dp, mean), jax.tree.map(lambda e: e[None], new_error)

  # Every replica decodes the same gathered payloads, so the sum is the same on every row.
  return jax.jit(jax.shard_map(body, mesh=group.mesh, in_specs=(rows, rows),
                               out_specs=(specs, rows), check_vma=False))


def local_values(params) -> int:
  """Gradient values one device of the stage holds: its TP shard of every parameter."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(params))


def bytes_per_step(params, group, bits: int, micro_batches: int, bucket: int = BUCKET) -> int:
  """DP bytes all the stage's devices send in one step (0 with one replica), ring algorithms:
  - fp32: each micro-batch's backward all-reduces its gradient, 2 (dp-1)/dp x 4 bytes x values
    per device;
  - compressed: one all-gather per step, (dp-1) x payload_bytes(values) per device."""
  dp, devices, n = group.dp, group.dp * group.tp, local_values(params)
  if dp == 1:
    return 0
  if bits == 0:
    return micro_batches * group.tp * 2 * (dp - 1) * 4 * n
  return devices * (dp - 1) * gradc.payload_bytes(n, bits, bucket)
