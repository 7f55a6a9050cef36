"""What each part of the model hears under DP, at the start of training: per-example gradient
norms split into the head and the LoRA B factors, and each part's per-step signal-to-noise ratio.

For one client of a config (default: the default job's client 2), after the run's own DP
feature-centring query (so the classifier reads what it reads in the run): the per-example
gradients of what the method trains at round 1, on N examples of the client. Per part (head;
LoRA B): the median, 10th and 90th percentile of ‖g_i‖ restricted to that part, and

    signal = ‖mean_i clip_C(g_i)|part‖      (the expected DP gradient, per example)
    noise  = σ·C·√d_part / (q·n)            (the norm of one step's noise on that part)

so signal / noise is how far one DP step moves along the true gradient against how far the
noise moves it (each step divides the clipped sum + noise by q·n; the sum's mean is q·n times
the per-example mean). Nothing is trained; takes a minute on 2 cores.

    PYTHONPATH=src python scripts/gradient_signal.py [key=value ...] [--client K] [--examples N]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(overrides: list[str], client: int, examples: int) -> list[dict]:
    import torch

    from fedlora.config import load_config
    from fedlora.experiment import build_experiment
    from fedlora.federation.server import FederationState, RoundPlan, gather_center
    from fedlora.federation.simulation import InProcessTransport
    from fedlora.methods import keys
    from fedlora.privacy.dpsgd import clip_factors, per_sample_gradients, per_sample_norms
    from fedlora.runner import _center_dim

    config = load_config(None, ["privacy.noise=seeded", *overrides])
    exp = build_experiment(config)
    if not 0 <= client < len(exp.clients):
        raise SystemExit(f"gradient_signal.py: --client {client}: the config has clients "
                         f"0…{len(exp.clients) - 1}")
    m, trainer, c = exp.method, exp.trainer, exp.clients[client]
    state = FederationState(glob=m.init_global(exp.initial))
    plan = RoundPlan(1, len(exp.clients), 0, 1, config.seed,
                     center_dim=_center_dim(config, trainer.handle))
    if plan.center_dim:
        gather_center(m, state, InProcessTransport(trainer, exp.clients), plan)
    trainer.handle.install(m.client_state(exp.initial, {}, m.download(state.glob, client), client))
    trained = trainer.handle.set_trainable(lambda k: m.trainable(k, 0))
    names = {trainer.names[k]: k for k in trained}
    idx = list(range(min(examples, c.num_examples)))
    trainer.model.train()
    grads = {}
    for start in range(0, len(idx), 32):
        part = idx[start:start + 32]
        g = per_sample_gradients(trainer.model, lambda part=part: trainer.per_example_loss(c, part))
        for n, v in g.items():
            grads.setdefault(n, []).append(v.detach())
    grads = {n: torch.cat(v) for n, v in grads.items()}
    clip, sigma = config.privacy.clip, c.privacy.noise_multiplier
    batch = c.privacy.sample_rate * c.num_examples
    factors = clip_factors(per_sample_norms(grads), clip)
    rows = []
    for label, pick in (("all trained", lambda k: True), ("head", keys.is_head),
                        ("LoRA B", keys.is_lora_b), ("LoRA A", keys.is_lora_a)):
        part = {n: g for n, g in grads.items() if pick(names[n])}
        if not part:
            continue
        norms = per_sample_norms(part)
        d = sum(g[0].numel() for g in part.values())
        mean = torch.cat([(factors.view(-1, *[1] * (g.dim() - 1)) * g).mean(0).flatten()
                          for g in part.values()])
        signal, noise = float(mean.norm()), sigma * clip * d ** 0.5 / batch
        q = torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9]))
        rows.append({"part": label, "parameters": d, "p10": float(q[0]), "median": float(q[1]),
                     "p90": float(q[2]), "signal": signal, "noise": noise,
                     "snr": signal / noise if noise else float("inf")})
    return rows, {"client": client, "examples": len(idx), "sigma": sigma, "batch": batch,
                  "alpha": config.method.alpha, "center": bool(plan.center_dim)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--client", type=int, default=2)
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args(argv)
    rows, facts = measure(args.overrides, args.client, args.examples)
    print(f"client {facts['client']}: {facts['examples']} examples, σ = {facts['sigma']:.3f}, "
          f"expected batch {facts['batch']:.0f}, α = {facts['alpha']:g}, centred: {facts['center']}")
    print(f"{'part':12s} {'params':>8s} {'‖g‖ p10':>8s} {'median':>8s} {'p90':>8s} "
          f"{'signal':>8s} {'noise':>8s} {'SNR':>7s}")
    for r in rows:
        print(f"{r['part']:12s} {r['parameters']:8,d} {r['p10']:8.3f} {r['median']:8.3f} "
              f"{r['p90']:8.3f} {r['signal']:8.4f} {r['noise']:8.4f} {r['snr']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
