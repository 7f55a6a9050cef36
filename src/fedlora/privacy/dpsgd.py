"""DP-SGD's private gradient: per-example gradients, flat clipping, Gaussian noise.

Per-example gradients come from Opacus's per-layer grad samplers
(`GradSampleModule.GRAD_SAMPLERS[type(module)]`: nn.Linear — PEFT's lora_A / lora_B and the
classifier head —, nn.Embedding, nn.LayerNorm, ...), driven by our own temporary hooks, so
the model is never wrapped: parameter names stay as they are and the same model can be used
round after round.

For a module computing y = f(x; θ) on a batch, the gradient of Σ_i L_i w.r.t. θ splits into
per-example terms because example i only touches rows i of x and y; the grad sampler turns
(x, ∂(Σ_j L_j)/∂y) into the n per-example gradients ∂L_i/∂θ (for nn.Linear:
∂L_i/∂W = Σ_t (∂L_i/∂y_{i,t}) x_{i,t}ᵀ over the sequence positions t).

A module marked reusable (`mark_reusable`: ResLoRA's block shortcut runs layer n−k's LoRA
factors again inside layer n) may run several times in one forward pass. Its per-example
gradient is then the sum over its calls c of each call's own, ∂L_i/∂θ = Σ_c G(x_c, ∂L/∂y_c)_i:
θ enters the loss once per call, and the chain rule adds the uses. Any other module that runs
twice is refused, as before (an accidental reuse is a bug, not a structure).
"""

from __future__ import annotations

from typing import Callable

import torch
from opacus.grad_sample import GradSampleModule
from torch import Tensor, nn

from fedlora.privacy.randomness import Stream, TorchStream

__all__ = ["per_sample_gradients", "record_layers", "mark_reusable", "per_sample_norms", "clip_factors", "clip_and_sum",
           "gaussian_noise", "clip_and_noise"]

NORM_EPS = 1e-6  # as Opacus: the clip factor is C / (‖g_i‖ + 1e-6)
REUSABLE = "fedlora_reusable"  # a module attribute: may run more than once per forward pass


def mark_reusable(module: nn.Module) -> None:
    """Let `module` run more than once per forward pass: its per-example gradient is summed
    over its calls (see the module docstring)."""
    setattr(module, REUSABLE, True)


# --------------------------------------------------------------------------- per-example grads


def _trainable_owners(model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]:
    """Modules that directly own trainable parameters, with their parameters' full names.

    Names are those of `model.named_parameters()`. Raises `TypeError` for a module type
    without an Opacus grad sampler and `ValueError` for a trainable parameter owned by two
    modules (tied weights: its per-example gradient would be split across two hooks).
    """
    owners, seen = [], {}
    for mod_name, module in model.named_modules():
        params = [(f"{mod_name}.{n}" if mod_name else n, p)
                  for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        for name, p in params:
            if id(p) in seen:
                raise ValueError(
                    f"trainable parameter {name!r} is shared with {seen[id(p)]!r} (tied weights); "
                    "per-example gradients of tied parameters are not supported: freeze or untie it"
                )
            seen[id(p)] = name
        if type(module) not in GradSampleModule.GRAD_SAMPLERS:
            raise TypeError(
                f"module {mod_name or '<root>'!r} of type {type(module).__qualname__} has trainable "
                f"parameters ({', '.join(n for n, _ in params)}) but Opacus has no per-example "
                "gradient function for that type; freeze those parameters"
            )
        owners.append((mod_name, module, params))
    return owners


class _Recorder:
    """Records one module's inputs (forward hook) and the gradient of its output, per call.

    The output gradient is caught by a tensor hook on the output, registered from the
    forward hook. (A full backward hook would fire only when the gradient w.r.t. the
    module's *inputs* is computed, which `torch.autograd.grad(..., inputs=params)` skips
    when those inputs lead to no requested parameter — e.g. an input that requires grad for
    another reason —, silently giving zero per-example gradients. The output's gradient is
    always computed, since the module's parameters' gradients depend on it.)
    A module runs once per forward pass unless it is marked reusable (`mark_reusable`); each
    call then keeps its own inputs and output gradient.
    """

    def __init__(self, name: str, reusable: bool = False):
        self.name = name
        self.reusable = reusable
        self.activations: list[list] = []  # per call: the module's inputs
        self.backprops: list[Tensor | None] = []  # per call: ∂(Σ_j L_j)/∂output, None if unused
        self.closed = False  # set once the forward pass is over

    def forward_hook(self, module: nn.Module, inputs: tuple, output) -> None:
        if self.closed:
            # Gradient checkpointing re-runs the forward of a checkpointed block inside the
            # backward pass to rebuild what it did not keep. The recomputed inputs equal those
            # recorded in the real forward, and (non-reentrant checkpointing) gradients flow
            # through the real forward's graph, whose output hook is already in place.
            return
        if self.activations and not self.reusable:
            raise RuntimeError(
                f"module {self.name!r} ran more than once in one forward pass; per-example "
                "gradients of reused modules are not supported"
            )
        if not inputs:
            raise RuntimeError(f"module {self.name!r} was called without positional inputs")
        call = len(self.activations)
        self.activations.append([t.detach() if isinstance(t, Tensor) else t for t in inputs])
        self.backprops.append(None)
        out = output if isinstance(output, Tensor) else output[0]  # as Opacus: grad_output[0]
        if out.requires_grad:
            out.register_hook(lambda grad: self._save_backprops(call, grad))

    def _save_backprops(self, call: int, grad: Tensor) -> None:
        self.backprops[call] = grad.detach()


def per_sample_gradients(
    model: nn.Module, per_example_loss: Callable[[], Tensor]
) -> dict[str, Tensor]:
    """Per-example gradients ∂L_i/∂θ of every trainable parameter θ.

    `per_example_loss()` runs the model and returns the n per-example losses L_1..L_n as a
    1-D tensor (not averaged). Σ_i L_i is back-propagated once with `torch.autograd.grad`
    (so `.grad` is not touched: it stays as it was, None in a training loop) and Opacus's
    grad samplers turn each module's inputs and output gradients into per-example gradients.
    Modules that own trainable parameters must see the batch as their first dimension and
    run at most once per forward (a second call raises `RuntimeError`) unless marked reusable
    (`mark_reusable`: their per-example gradients are summed over their calls). Activations may be 3-D
    (n, T, d): a sequence's gradient sums over its positions. Non-reentrant gradient
    checkpointing is supported (its recomputation in the backward pass is ignored).

    Returns `{name: tensor of shape (n, *param.shape)}` keyed by `model.named_parameters()`
    names. A trainable parameter that did not take part in the loss gets zeros. With n = 0
    the tensors have shape (0, *param.shape) (the shape `clip_and_noise` wants for an empty
    batch). The module hooks are removed before returning, also on error (the tensor hooks
    live on this call's autograd graph and go with it).
    """
    owners, recorders, n = record_layers(model, per_example_loss)
    out: dict[str, Tensor] = {}
    for (mod_name, module, params), rec in zip(owners, recorders):
        out.update(_module_grad_samples(module, params, rec, n))
    return out


def record_layers(model: nn.Module, per_example_loss: Callable[[], Tensor]):
    """Run `per_example_loss()` and back-propagate Σ_i L_i once, recording what every module
    that owns trainable parameters saw: its inputs and the gradient of its output, per call.

    Returns `(owners, recorders, n)`: `_trainable_owners(model)`, one `_Recorder` per owner,
    and the number n of per-example losses. `.grad` is not touched; the module hooks are
    removed before returning, also on error. (Shared by `per_sample_gradients` and the ghost
    clipping path, `fedlora.privacy.ghost`.)"""
    owners = _trainable_owners(model)
    recorders = [_Recorder(name, getattr(module, REUSABLE, False)) for name, module, _ in owners]
    handles = []
    try:
        for (_, module, _), rec in zip(owners, recorders):
            handles.append(module.register_forward_hook(rec.forward_hook))
        losses = per_example_loss()
        for rec in recorders:
            rec.closed = True
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError("per_example_loss() must return a 1-D tensor of per-example losses")
        if losses.shape[0] > 0 and not losses.requires_grad:
            raise ValueError("per_example_loss() returned losses that do not require grad "
                             "(run under torch.no_grad(), or no trainable parameter was used?)")
        n = losses.shape[0]
        params = [p for _, _, ps in owners for _, p in ps]
        if n > 0 and params:
            torch.autograd.grad(losses.sum(), params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return owners, recorders, n


def _module_grad_samples(module: nn.Module, params: list[tuple[str, nn.Parameter]],
                         rec: _Recorder, n: int) -> dict[str, Tensor]:
    """One module's per-example gradients from its recorded activations and backprops,
    summed over its calls (one call unless the module is reusable)."""
    out = {name: p.new_zeros((n, *p.shape)) for name, p in params}
    if n == 0:
        return out  # an empty batch
    for activations, backprops in zip(rec.activations, rec.backprops):
        if backprops is None:
            continue  # this call's output did not reach the loss: it adds nothing
        if backprops.shape[0] != n:
            raise ValueError(
                f"module {rec.name!r}: output batch dimension is {backprops.shape[0]}, but there "
                f"are {n} per-example losses; the batch must be the first dimension everywhere"
            )
        # Under autocast (train.precision = "bf16") activations and output gradients are bf16;
        # the per-example gradients (so their norms and the clipping) are computed in fp32.
        grads = GradSampleModule.GRAD_SAMPLERS[type(module)](
            module, [_fp32(a) for a in activations], _fp32(backprops))
        for name, p in params:
            if p not in grads:
                raise RuntimeError(f"Opacus's grad sampler gave no per-example gradient for {name!r}")
            out[name] += grads[p].to(p.dtype)
    return out


def _fp32(t):
    """A low-precision floating tensor upcast to fp32; anything else as it is."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype in (torch.bfloat16, torch.float16):
        return t.float()
    return t


# --------------------------------------------------------------------------- clip and noise


def per_sample_norms(grad_samples: dict[str, Tensor]) -> Tensor:
    """‖g_i‖ = sqrt(Σ_θ ‖g_i^θ‖²): example i's gradient norm over all parameters together."""
    per_param = [g.flatten(start_dim=1).norm(2, dim=1) for g in grad_samples.values()]
    return torch.stack(per_param).norm(2, dim=0)


def clip_factors(norms: Tensor, clip: float) -> Tensor:
    """min(1, C / (‖g_i‖ + 1e-6)): scaling each g_i by it gives ‖g_i‖ ≤ C."""
    return (clip / (norms + NORM_EPS)).clamp(max=1.0)


def clip_and_sum(grad_samples: dict[str, Tensor], clip: float) -> tuple[dict[str, Tensor], Tensor]:
    """Σ_i min(1, C/(‖g_i‖+1e-6)) · g_i per parameter (flat clipping over all parameters), and
    the per-example norms ‖g_i‖ before clipping, shape (n,). Adding or removing one example
    moves the sum by at most C: the sensitivity the Gaussian noise is scaled to."""
    if not grad_samples:
        raise ValueError("grad_samples is empty: no trainable parameters")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    sizes = {g.shape[0] for g in grad_samples.values()}
    if len(sizes) != 1:
        raise ValueError(f"grad samples disagree on the batch size: {sorted(sizes)}")
    norms = per_sample_norms(grad_samples)
    factors = clip_factors(norms, clip)
    summed = {name: torch.einsum("i,i...->...", factors.to(g.dtype), g)
              for name, g in grad_samples.items()}
    return summed, norms


def gaussian_noise(shapes: dict[str, tuple[int, ...]], std: float, stream: Stream,
                   dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """N(0, std² I) for each parameter, drawn from `stream` one parameter at a time in sorted
    name order (so the same stream gives the same noise whatever order the names come in), on
    the CPU: a secret or seeded CPU stream gives GPU gradients the very noise it gives CPU ones."""
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std!r}")
    return {name: stream.normal(tuple(shapes[name]), std, dtype) for name in sorted(shapes)}


def clip_and_noise(
    grad_samples: dict[str, Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | Stream | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """DP-SGD's private gradient, with flat clipping over all parameters:

        g = (Σ_i min(1, C/(‖g_i‖+1e-6)) · g_i + N(0, σ²C² I)) / B

    with C = `clip`, σ = `noise_multiplier`, B = `expected_batch_size` (q·N under Poisson
    sampling: dividing by the *expected* size keeps the sensitivity C/B independent of the
    sampled batch). `grad_samples[name]` has shape (n, *param.shape); for an empty batch pass
    tensors of shape (0, *param.shape) — the result is then pure noise / B.

    The noise comes from `generator`: a `Stream` (`fedlora.privacy.randomness`) or a torch
    generator (as a seeded stream), see `gaussian_noise`; with σ = 0 nothing is drawn. Returns
    the private gradients (same names and order as `grad_samples`) and the per-example norms
    ‖g_i‖ before clipping, shape (n,).
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
    summed, norms = clip_and_sum(grad_samples, clip)
    if noise_multiplier > 0:
        stream = generator if not isinstance(generator, (torch.Generator, type(None))) \
            else TorchStream.of(generator)
        noise = gaussian_noise({n: tuple(g.shape) for n, g in summed.items()},
                               noise_multiplier * clip, stream, next(iter(summed.values())).dtype)
        for name in summed:
            summed[name] += noise[name].to(summed[name])
    return {name: s / expected_batch_size for name, s in summed.items()}, norms
