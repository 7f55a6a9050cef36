"""Chains of LoRA (COLA, Xia et al., arXiv 2401.04151), federated: `method.chain_every = K`.

Training is a chain of links. Link j is a LoRA (A_j, B_j) trained for K rounds by the method as
usual; then it is merged into the frozen weights and link j+1 starts fresh (B = 0, a new A):

    W = W0 + Σ_{i<j} s·B_i·A_i + s·B_j·A_j          (s = α/r)

so the model can leave the rank-r subspace one adapter spans (for FFA-LoRA: the one fixed
random A) while every client still trains only a rank-r adapter, and each link's aggregation is
the method's own (exact for FFA-LoRA: every client holds the same A_j).

State. The server keeps the merged links as factors in `GlobalState.links`, keyed
`link:<i>:<adapter key>`, with each link's B stored already scaled (s·B_i), so the change of
a layer's weight is Σ_i link_B_i·link_A_i (`base_change`). `AdapterHandle.install` adds it to
W0, so clients, the evaluator and the export all see the same model.

The wire. Links travel in the download as factors (r × d each, never d_out × d_in): a client
needs link B's it cannot compute. It never gets what it can compute: where A is not
communicated (FFA-LoRA), A_j and every link's A come from `fresh_a(A_0, j)`, which each client
evaluates from the A_0 it built from the shared seed (`complete`); the server sends none of them.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from fedlora.methods import keys

State = dict[str, Tensor]

LINK = "link:"


def link_key(link: int, key: str) -> str:
    """`link:<link>:<adapter key>`: the merged factor `key` of link `link`."""
    return f"{LINK}{link}:{key}"


def is_link(key: str) -> bool:
    return key.startswith(LINK)


def unlink(key: str) -> tuple[int, str]:
    """`link:3:…lora_B.weight` → (3, `…lora_B.weight`)."""
    link, rest = key[len(LINK):].split(":", 1)
    return int(link), rest


def links_in(state: State) -> int:
    """How many links `state` holds merged (the current link's number)."""
    return 1 + max((unlink(k)[0] for k in state if is_link(k)), default=-1)


def fresh_a(a0: Tensor, link: int) -> Tensor:
    """Link `link`'s A: A_0 itself for link 0, else PEFT's initialisation of A,
    U(−1/√d_in, 1/√d_in) (kaiming-uniform with a = √5), drawn from a generator seeded by
    SHA-256(A_0's bytes, link). A_0 comes from the run's shared seed, so every client and the
    server draw the same A_j without anything crossing the wire (A is public: it is no secret)."""
    if link == 0:
        return a0
    data = a0.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha256(data + f"fedlora/chain/link {link}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    bound = 1.0 / math.sqrt(a0.shape[1])
    u = torch.rand(a0.shape, generator=gen, dtype=torch.float64)
    return ((2 * u - 1) * bound).to(a0.dtype)


def close_link(adapter: State, links: State, scaling: float) -> tuple[State, State]:
    """Merge the current link into `links` and start the next: (new adapter, new links).

    Every LoRA layer's (A, B) goes to `links` as (A, s·B); the adapter restarts with B = 0 and
    A = `fresh_a(link 0's A, j + 1)`. Other tensors (the head) carry on unchanged.
    """
    j = links_in(links)
    adapter, links = dict(adapter), dict(links)
    for a, b in keys.lora_modules(adapter).values():
        links[link_key(j, a)] = adapter[a].clone()
        links[link_key(j, b)] = (scaling * adapter[b].double()).to(adapter[b].dtype)
        adapter[a] = fresh_a(links[link_key(0, a)], j + 1)
        adapter[b] = torch.zeros_like(adapter[b])
    return adapter, links


def complete(initial: State, state: State, communicated) -> State:
    """A client's full state: the A of the current link and of every merged link that the
    server did not send (`communicated(key)` false for A), drawn with `fresh_a` from the
    initial A_0 — what the server holds, rebuilt without a byte."""
    j = links_in(state)
    if j == 0:
        return state
    state = dict(state)
    for a in (k for k in initial if keys.is_lora_a(k) and not communicated(k)):
        state[a] = fresh_a(initial[a], j)
        for i in range(j):
            state.setdefault(link_key(i, a), fresh_a(initial[a], i))
    return state


def base_change(state: State) -> dict[str, Tensor]:
    """Base-weight key → Σ_i link_B_i·link_A_i over the links in `state` (float64)."""
    out: dict[str, Tensor] = {}
    for key, b in state.items():
        if not is_link(key) or not keys.is_lora_b(key):
            continue
        link, name = unlink(key)
        a = state[link_key(link, name.replace(".lora_B.", ".lora_A."))]
        base = keys.base_of(name.split(".lora_B.")[0])
        term = b.double() @ a.double()
        out[base] = term if base not in out else out[base] + term.to(out[base].device)
    return out
