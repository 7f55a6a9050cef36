"""Typed, validated configuration: a TOML file plus `section.key=value` overrides.

Every key is a field of one dataclass below; its `help` metadata is the documentation shown in
error messages. Configs are validated once, here, at the boundary: the rest of the package can
trust them. Errors are `ConfigError`s that name the key and the fix, raised before anything
is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "group")
OPTIMIZERS = ("sgd", "adam", "lora_pro", "lora_rite")
LORA_OPTIMIZERS = ("lora_pro", "lora_rite")  # they need one (A, B) per layer: Method.lora_pairs
SERVER_OPTIMIZERS = ("avg", "momentum", "adam")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("constant", "cosine")  # fedlora.optim.schedule
GHOST_CLIPPING = ("auto", "on", "off")  # fedlora.privacy.ghost.MODES is this tuple
WEIGHTINGS = ("examples", "inverse_noise")
HEADS = ("shared", "local")
ACCOUNTANTS = ("rdp", "prv", "pld")  # fedlora.privacy.epsilon.KINDS is this tuple
NOISE = ("secret", "seeded")  # where DP randomness comes from: fedlora.privacy.randomness
CENTERS = ("auto", "off")
BAD_UPDATE = ("skip", "stop")
TASKS = ("classification", "causal")
SCORERS = ("numeric", "gsm", "exact")
POOLINGS = ("auto", "cls", "mean", "mean_normalized")
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Each list is declared here, once, with its option, so that reading and checking a config
# needs no torch; the code that implements the values uses these names (tests check that
# every listed value has an implementation and nothing else does). Method names are the
# exception: the method registry owns them (a new method file registers itself).


def valid_device_name(name: object) -> bool:
    """Is `name` one of auto, cpu, cuda, cuda:N (checked without looking for a GPU)."""
    return isinstance(name, str) and _DEVICE.fullmatch(name) is not None


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TaskConfig:
    kind: str = _f("classification", "classification (a text → label head on an encoder) or causal "
                   "(prompt → answer with a causal LM: loss on the answer tokens, generation scored "
                   "by exact match); for causal, data.text_column is the prompt and "
                   "data.label_column the answer")
    chat_template: bool = _f(True, "causal: wrap each prompt in the tokenizer's chat template "
                             "(when it has one) as a user turn")
    max_new_tokens: int = _f(16, "causal: tokens generated per held-out prompt at evaluation "
                             "(greedy); bounds the evaluation's cost")
    scorer: str = _f("numeric", f"causal: exact match of a generation — {', '.join(SCORERS)} "
                     "(numeric: its last number equals the answer; gsm: reasoning-gym's "
                     "gsm_symbolic scorer; exact: the stripped text equals the answer)")
    export_merged: bool = _f(True, "causal: also write merged/, the base with the adapter folded "
                             "in, loadable by plain transformers")


@dataclass
class ModelConfig:
    path: str = _f("all-MiniLM-L6-v2", "shipped model name or a Hugging Face model folder")
    max_length: int = _f(64, "tokens kept per text (the shipped snippets are at most ~70 tokens)")
    pooling: str = _f("auto", "classifier input: auto (the checkpoint's own pooling), cls, mean, "
                      "mean_normalized")
    center: str = _f("auto", "subtract the clients' DP mean feature from the classifier input: "
                     "auto (when the features are unit-norm, i.e. mean_normalized pooling) or off")
    center_examples: int = _f(1024, "expected examples per client (Poisson-sampled) in the DP "
                              "feature mean computed before round 1")


@dataclass
class DataConfig:
    path: str = _f("rotten_tomatoes", "shipped data set name or a .csv/.tsv/.jsonl file (.bz2/.gz ok)")
    text_column: str = _f("text", "column holding the text")
    label_column: str = _f("category", "column holding the label (strings or integers)")
    group_column: str = _f("movie_name", "column whose groups stay whole under partition='group'")
    test_fraction: float = _f(0.2, "share of examples held out for testing (stratified)")
    validation_fraction: float = _f(
        0.0, "share of the remaining examples held out for choosing hyperparameters (0 = none)"
    )
    partition: str = _f("dirichlet", f"how clients split the training data: {', '.join(PARTITIONS)}")
    dirichlet_alpha: float = _f(0.5, "Dirichlet concentration; small = more skewed labels per client")
    max_examples: int = _f(0, "use only this many examples, drawn at random (0 = all); for quick runs")


@dataclass
class FederationConfig:
    clients: int = _f(3, "number of data owners")
    rounds: int = _f(5, "federated rounds")
    local_steps: int = _f(4, "DP-SGD steps each client takes per round")
    clients_per_round: int = _f(0, "clients sampled each round (0 = all)")
    eval_every: int = _f(1, "evaluate the global model every k rounds (and always after the last)")
    eval_examples: int = _f(
        512, "rounds before the last evaluate on a fixed stratified random subset of this many "
        "held-out examples, drawn from the run's seed (per test/validation set; personalised "
        "models: an equal share per client); 0 = the whole set. The last round, and so every "
        "score in the summary, always uses the whole set")
    min_clients: int = _f(
        1, "a round goes on with the sites that answered if at least this many did (Flower: a "
           "site that fails or disconnects is logged and skipped); fewer stops the run"
    )
    checkpoint_every: int = _f(
        1, "write a resumable checkpoint every k rounds (and after the last); 0 = never")
    on_bad_update: str = _f(
        "skip", f"a client update that fails validation: {', '.join(BAD_UPDATE)} "
        "(skip = reject it and go on with the others; stop = end the run)")
    max_update_norm: float = _f(
        0.0, "reject an update whose L2 distance from what the client was sent exceeds this "
        "(0 = no bound)")
    secure_aggregation: bool = _f(
        False, "Flower only: each round's uploads are summed with SecAgg+ — the server sees "
        "only the sites' weighted mean (docs/secure-aggregation.md); needs a method whose "
        "aggregate is a function of that mean, federation.max_update_norm > 0 (the "
        "quantisation range) and at least 3 sites per round")
    evaluate_initial: bool = _f(
        False, "also evaluate the starting model before round 1 (summary: 'initial')")
    server_optimizer: str = _f("avg", f"the server's step from the aggregate: {', '.join(SERVER_OPTIMIZERS)} "
                               "(FedAvg, FedAvgM, FedAdam; post-processing, no ε cost)")
    server_lr: float = _f(1.0, "server learning rate η of momentum/adam (adam wants ~0.01-0.1)")
    server_momentum: float = _f(0.9, "β of the server's momentum (server_optimizer = momentum)")
    weighting: str = _f("examples", "aggregation weights: examples (FedAvg, w_k ∝ n_k) or "
                        "inverse_noise (w_k ∝ (q_k·n_k/σ_k)², the minimum-variance combination of "
                        "the clients' DP noise; public facts only, no ε cost; for methods whose "
                        "aggregate is a weighted mean, under DP)")


@dataclass
class MethodConfig:
    name: str = _f("ffa", "federated method (see `fedlora methods`)")
    rank: int = _f(8, "LoRA rank r")
    alpha: float = _f(1.0, "LoRA scaling alpha; the update is (alpha/r)·B·A")
    target_modules: list[str] = _f(["query", "value"], "names of the linear layers that get LoRA")
    client_ranks: list[int] = _f(
        [], "one LoRA rank per client, e.g. [4, 8, 16] (empty = every client uses method.rank); "
        "the shared model is built at the largest and every client is scaled by alpha/max rank")
    head: str = _f("shared", f"task head policy: {', '.join(HEADS)} (local = personal, never uploaded; "
                   "evaluation is then each client's own model on its own held-out data)")
    chain_every: int = _f(0, "chain of LoRA (COLA): every this many rounds the adapter is merged "
                          "into the frozen weights and a fresh one starts (0 = off; for xgblora, "
                          "0 = a new booster every round)")
    boost_fraction: float = _f(1.0, "xgblora only: the chance that a LoRA layer takes part in a "
                               "booster (the paper's random layer selection, a public coin per "
                               "layer and booster); 1 = every layer in every booster")
    reslora_blocks: int = _f(1, "reslora only: how many previous layers' LoRA blocks each layer "
                             "adds to its own in training (the paper's block shortcut; the export "
                             "merges them exactly into a plain LoRA of rank (this+1)·r)")
    galore_update_every: int = _f(4, "galore only: refresh each matrix's projection (SVD of its "
                                  "privatised gradient) every this many local steps")
    galore_scale: float = _f(0.25, "galore only: the scale α of the back-projected step (the paper's 0.25)")
    mole_temperature: float = _f(1.0, "mole only: the temperature τ of each gate's softmax over the "
                                 "experts (MoLE's gate: softmax(G·Norm([E_1; …; E_N])/τ))")
    mole_balance: float = _f(0.01, "mole only: weight α of MoLE's gate-balancing loss −Σ_j log q_j "
                             "(q_j: expert j's mean gate weight over one example's tokens and the "
                             "layers; 0 = off)")

    @property
    def max_rank(self) -> int:
        """The rank the shared model is built at: the largest client rank."""
        return max(self.client_ranks) if self.client_ranks else self.rank


@dataclass
class TrainConfig:
    batch_size: int = _f(256, "expected examples per DP-SGD step (Poisson sampling)")
    lr: float = _f(0.02, "learning rate of the local optimizer")
    lr_schedule: str = _f("constant", "the local rates over the rounds: constant, or cosine "
                          "(round t = 1…R steps at ½·(1 + cos(π·(t−1)/R)) × train.lr and × "
                          "train.head_lr; a public function of the round, no ε cost)")
    head_lr: float = _f(0.0, "learning rate of the task head (0 = train.lr). The head starts from "
                        "scratch; an optimizer whose steps are sized like full fine-tuning's "
                        "(lora_pro, galore, full) wants a far smaller train.lr than the head does")
    optimizer: str = _f("adam", f"local optimizer: {', '.join(OPTIMIZERS)} (lora_pro: LoRA-Pro, "
                        "Wang et al. 2024 — the factors' gradients adjusted so the LoRA step best "
                        "approximates the full-weight gradient, Adam on that equivalent gradient "
                        "(two full-size moments per layer); with A frozen (ffa) g_B·(AAᵀ)⁻¹/s². "
                        "lora_rite: LoRA-RITE, Yen et al. 2024 — an adaptive preconditioner "
                        "invariant to how B·A is factored. Both post-process the privatised "
                        "gradient (ε unchanged), give the head plain Adam, are reset each round, "
                        "and need one LoRA (A, B) per layer at one rank: not full, head, hetlora "
                        "or method.client_ranks)")
    momentum: float = _f(0.9, "SGD momentum (reset each round: optimizer state never leaves a client)")
    micro_batch_size: int = _f(0, "examples per forward pass (0 = for the device: 64 on a CPU, 256 on "
                               "a GPU); a batch is split, never changed")
    gradient_checkpointing: bool = _f(
        False, "recompute activations in the backward pass: less memory, more compute; "
        "per-example DP gradients stay exact")
    eval_batch_size: int = _f(512, "examples per evaluation batch")
    precision: str = _f("fp32", f"{' or '.join(PRECISIONS)}: bf16 runs the training forward and "
                        "backward passes under autocast (bfloat16 matmuls); per-example gradients, "
                        "their norms, clipping, noise, the optimizer and every upload stay fp32, "
                        "and evaluation runs in fp32 (the model as exported). Fast only where the "
                        "hardware has bf16 units (GPUs, CPUs with AVX512-BF16/AMX); elsewhere slower")
    ghost_clipping: str = _f("auto", f"{', '.join(GHOST_CLIPPING)}: how DP-SGD gets each example's "
                             "gradient norm and the clipped sum for nn.Linear and nn.Embedding layers: from Gram "
                             "matrices of their inputs and output gradients without per-example "
                             "gradients (ghost clipping + book-keeping; on), by materialising them "
                             "(off), or per layer whichever costs fewer multiply-adds (auto: LoRA factors and "
                             "the head materialised, full weights and word embeddings by Gram matrices). Same "
                             "result either way (float rounding aside)")


@dataclass
class PrivacyConfig:
    epsilon: float = _f(3.0, "privacy budget per client over all rounds; inf turns DP off")
    delta: float = _f(1e-5, "delta of (epsilon, delta)-DP")
    clip: float = _f(1.0, "per-example gradient norm bound")
    accountant: str = _f("rdp", f"privacy accountant: {', '.join(ACCOUNTANTS)}")
    noise: str = _f("secret", "where DP noise and Poisson sampling come from: secret (a key each "
                    "client makes and never shares: ε holds against the server too) or seeded "
                    "(from the run's seed, reproducible bit for bit: ε then holds only against "
                    "parties who do not know the seed — for research)")
    center_noise: float = _f(5.0, "noise multiplier of the Gaussian mechanism on each client's "
                             "feature sum (model.center; accounted with the DP-SGD steps)")


@dataclass
class Config:
    seed: int = _f(0, "seed for the split, LoRA A and client sampling (and DP noise, with "
                   "privacy.noise=seeded)")
    threads: int = _f(0, "torch CPU threads (0 = all cores)")
    device: str = _f("auto", "where the model computes: auto (cuda if available, else cpu), cpu, "
                     "cuda or cuda:N; sampling and DP noise are drawn on the CPU either way")
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def private(self) -> bool:
        return not math.isinf(self.privacy.epsilon)


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {n: t for n, t in hints.items() if dataclasses.is_dataclass(t)}


def _keys(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then `section.key=value` overrides; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a `Config` from nested plain values (as parsed from TOML)."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a table of sections, e.g. {'privacy': {'epsilon': 3}}")
    sections = _sections()
    top = _keys(Config)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table of keys, not {value!r}")
            kwargs[key] = _build_section(key, sections[key], value)
        elif key in top:
            kwargs[key] = _coerce(key, top[key], value)
        else:
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, list(top))}")
    config = Config(**kwargs)
    validate(config)
    return config


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = _keys(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{name}.{key}'{_suggest(key, list(hints), name)}")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return cls(**kwargs)


def _suggest(key: str, valid: list[str], section: str | None = None) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    prefix = f"{section}." if section else ""
    hint = f" — did you mean '{prefix}{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(prefix + v for v in valid)}"


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are expected."""
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
    elif typing.get_origin(typ) is list:
        item = typing.get_args(typ)[0]
        ok = isinstance(value, list) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value)
    else:  # pragma: no cover - a new field type without a rule is a bug
        raise TypeError(f"no type rule for {key}: {typ}")
    if not ok:
        name = str(typ) if typing.get_origin(typ) else getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key} must be {_article(name)}, got {value!r} ({type(value).__name__})")
    return value


def _article(name: str) -> str:
    return {"list": "a list of strings", "list[int]": "a list of integers",
            "list[str]": "a list of strings", "int": "an integer", "float": "a number"}.get(
        name, f"a {name}"
    )


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config: file '{path}' not found — give the path of a TOML config file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"--config: '{path}' is not UTF-8 text — save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: '{path}' is not valid TOML ({err}) — fix the syntax") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`section.key=value` with a TOML value (`3`, `inf`, `"x"`, `[..]`); bare words are strings."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. privacy.epsilon=3")
    value = _parse_value(text.strip())
    parts = key.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"override '{item}': key must be 'section.key' or a top-level key like 'seed'")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = value


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.startswith(("[", "{", '"', "'")):
            raise ConfigError(f"override value {text!r} is not valid TOML") from None
        return text


# ---------------------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Impossible values stop here with a message naming the key and the fix."""
    for section, cls in _sections().items():
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"{section}.{key} is NaN — give a number")
    c = config
    _check(c.seed >= 0, "seed must be ≥ 0")
    _check(c.threads >= 0, "threads must be ≥ 0 (0 = all cores)")
    _check(valid_device_name(c.device), f"device must be one of {', '.join(DEVICE_NAMES)} "
           f"(N = GPU index, e.g. cuda:0), got {c.device!r}")
    _check(c.model.pooling in POOLINGS,
           f"model.pooling must be one of {', '.join(POOLINGS)}, got '{c.model.pooling}'")
    _check(c.model.max_length >= 8, "model.max_length must be ≥ 8 tokens")
    _check(c.model.center in CENTERS,
           f"model.center must be one of {', '.join(CENTERS)}, got '{c.model.center}'")
    _check(c.model.center_examples >= 1, "model.center_examples must be ≥ 1, e.g. 1024")
    _check(0 < c.data.test_fraction < 1, "data.test_fraction must be in (0, 1), e.g. 0.2")
    _check(0 <= c.data.validation_fraction < 1, "data.validation_fraction must be in [0, 1)")
    _check(c.data.test_fraction + c.data.validation_fraction < 0.9,
           "data.test_fraction + data.validation_fraction must leave ≥ 10% for training")
    _check(c.data.partition in PARTITIONS,
           f"data.partition must be one of {', '.join(PARTITIONS)}, got '{c.data.partition}'")
    _check(c.data.dirichlet_alpha > 0 and math.isfinite(c.data.dirichlet_alpha),
           "data.dirichlet_alpha must be a positive number, e.g. 0.5")
    _check(c.data.max_examples >= 0, "data.max_examples must be ≥ 0 (0 = all)")
    f = c.federation
    _check(f.clients >= 1, "federation.clients must be ≥ 1")
    _check(f.rounds >= 1, "federation.rounds must be ≥ 1")
    _check(f.local_steps >= 1, "federation.local_steps must be ≥ 1")
    _check(0 <= f.clients_per_round <= f.clients,
           f"federation.clients_per_round must be in [0, {f.clients}] (0 = all clients)")
    _check(f.eval_every >= 1, "federation.eval_every must be ≥ 1")
    _check(f.eval_examples >= 0, f"federation.eval_examples must be ≥ 0, got {f.eval_examples} — "
           "e.g. 512 (a fixed subset before the last round) or 0 (always the whole set)")
    per_round = f.clients_per_round or f.clients
    _check(1 <= f.min_clients <= per_round,
           f"federation.min_clients must be in [1, {per_round}] (the clients asked each round)")
    _check(f.checkpoint_every >= 0, "federation.checkpoint_every must be ≥ 0 (0 = never)")
    _check(f.on_bad_update in BAD_UPDATE,
           f"federation.on_bad_update must be one of {', '.join(BAD_UPDATE)}, got '{f.on_bad_update}'")
    _check(f.max_update_norm >= 0 and not math.isinf(f.max_update_norm),
           "federation.max_update_norm must be a finite number ≥ 0 (0 = no bound)")
    _check(f.server_optimizer in SERVER_OPTIMIZERS, f"federation.server_optimizer must be one of "
           f"{', '.join(SERVER_OPTIMIZERS)}, got '{f.server_optimizer}'")
    _check(f.server_lr > 0 and math.isfinite(f.server_lr), "federation.server_lr must be a positive number")
    _check(0 <= f.server_momentum < 1, "federation.server_momentum must be in [0, 1)")
    m = c.method
    from fedlora.methods import available_methods, method_class

    _check(m.name in available_methods(),
           f"method.name '{m.name}' is unknown — choose one of {', '.join(available_methods())}")
    _check(m.rank >= 1, "method.rank must be ≥ 1, e.g. 8")
    _check(m.alpha > 0 and math.isfinite(m.alpha), "method.alpha must be a positive number")
    _check(len(m.target_modules) > 0, "method.target_modules must name at least one layer")
    _check(m.head in HEADS, f"method.head must be one of {', '.join(HEADS)}, got '{m.head}'")
    if m.client_ranks:
        from fedlora.methods import method_class

        supported = [n for n in available_methods() if method_class(n).supports_client_ranks]
        _check(method_class(m.name).supports_client_ranks,
               f"method.client_ranks: method '{m.name}' needs the same rank on every client — "
               f"remove method.client_ranks or choose one of {', '.join(supported)}")
        _check(len(m.client_ranks) == f.clients,
               f"method.client_ranks has {len(m.client_ranks)} ranks for {f.clients} clients — "
               "give one rank per client (federation.clients)")
        _check(all(r >= 1 for r in m.client_ranks), "method.client_ranks must all be ≥ 1")
    _check(m.chain_every >= 0, "method.chain_every must be ≥ 0 (0 = no chain), e.g. 2")
    _check(0 < m.boost_fraction <= 1, "method.boost_fraction must be in (0, 1], e.g. 0.5")
    _check(m.boost_fraction == 1 or m.name == "xgblora", "method.boost_fraction is xgblora's random "
           f"layer selection — set method.name=xgblora or remove it (method '{m.name}')")
    fixed = method_class(m.name).fixed_rank
    if fixed is not None:
        _check(m.rank == fixed and not m.client_ranks, f"method.name '{m.name}' is defined at rank "
               f"{fixed} — set method.rank={fixed} (got {m.rank}) and no method.client_ranks")
    if m.chain_every or method_class(m.name).always_chained:
        chainable = [n for n in available_methods() if method_class(n).supports_chains]
        _check(method_class(m.name).supports_chains,
               f"method.chain_every: method '{m.name}' cannot be chained — set method.chain_every=0 "
               f"or choose one of {', '.join(chainable)}")
        _check(not m.client_ranks, "method.chain_every needs the same rank on every client — "
               "remove method.client_ranks or set method.chain_every=0")
        _check(m.head == "shared", "method.chain_every needs a shared head (method.head='shared'): "
               "a local head is personal, the links are shared")
    _check(f.weighting in WEIGHTINGS, f"federation.weighting must be one of {', '.join(WEIGHTINGS)}, "
           f"got '{f.weighting}'")
    if f.weighting == "inverse_noise":
        weighable = [n for n in available_methods() if method_class(n).averages]
        _check(method_class(m.name).averages, f"federation.weighting='inverse_noise': method "
               f"'{m.name}' does not aggregate by a weighted mean — use federation.weighting="
               f"examples or one of {', '.join(weighable)}")
        _check(math.isfinite(c.privacy.epsilon), "federation.weighting='inverse_noise' weighs the "
               "clients' DP noise, and privacy.epsilon=inf adds none — set a finite "
               "privacy.epsilon or federation.weighting=examples")
        _check(not f.secure_aggregation, "federation.weighting='inverse_noise' with "
               "federation.secure_aggregation: the sites weigh their own updates by n_k before "
               "masking — use federation.weighting=examples")
    if f.server_optimizer != "avg":
        steppable = [n for n in available_methods() if method_class(n).averages]
        _check(method_class(m.name).averages,
               f"federation.server_optimizer='{f.server_optimizer}': method '{m.name}' does not "
               "average its uploads into the previous state (its server step re-factors, merges "
               f"or corrects) — use federation.server_optimizer=avg or one of {', '.join(steppable)}")
        _check(not m.chain_every, "federation.server_optimizer needs method.chain_every=0 (a "
               "chain's merge is not a step of the adapter)")
    if f.secure_aggregation:
        _validate_secure_aggregation(c)
    _check(m.galore_update_every >= 1, "method.galore_update_every must be ≥ 1, e.g. 4")
    _check(m.galore_scale > 0 and math.isfinite(m.galore_scale), "method.galore_scale must be a positive number")
    _check(m.mole_temperature > 0 and math.isfinite(m.mole_temperature),
           "method.mole_temperature must be a positive number, e.g. 1.0")
    _check(m.mole_balance >= 0 and math.isfinite(m.mole_balance),
           "method.mole_balance must be a finite number ≥ 0 (0 = no balancing loss), e.g. 0.01")
    if m.name == "mole":
        _check(c.task.kind == "classification", f"method.name 'mole' mixes its experts with a gate "
               f"that reads each input, which a {c.task.kind} task's merged export cannot hold — "
               "use task.kind=classification, or another method (e.g. method.name=fedsa)")
    if m.name == "galore":
        _check(c.train.optimizer == "adam", f"method.name 'galore' brings its own projected Adam — "
               f"set train.optimizer=adam (got '{c.train.optimizer}')")
    _check(m.reslora_blocks >= 1, "method.reslora_blocks must be ≥ 1, e.g. 1")
    if m.name == "reslora":
        _check(c.task.kind == "classification",
               f"method.name 'reslora' exports its residual paths merged into the adapter; a "
               f"{c.task.kind} task's merged model is built from the live layers and would lose "
               "them — use task.kind=classification, or method.name=lora")
        _check(c.train.optimizer not in LORA_OPTIMIZERS,
               f"train.optimizer={c.train.optimizer} adjusts each layer's (A, B) as that layer's "
               "alone, but method.name 'reslora' also adds them to the next method.reslora_blocks "
               "layers — choose train.optimizer=adam (or sgd)")
    if not method_class(m.name).trains_adapter:
        _check(c.task.kind == "classification",
               f"method.name '{m.name}' trains only a classifier's head, and a {c.task.kind} task has "
               "none — choose an adapter method (e.g. method.name=ffa)")
        _check(m.head == "shared", f"method.name '{m.name}' with method.head='local' would share "
               "nothing — set method.head='shared'")
    personalised = m.head == "local" or method_class(m.name).always_personalised
    _check(not (personalised and c.data.validation_fraction > 0),
           "data.validation_fraction > 0 is not supported with personalised models "
           "(method.head='local' or a personalised method) — set data.validation_fraction=0")
    t = c.train
    _check(t.batch_size >= 1, "train.batch_size must be ≥ 1")
    _check(t.lr > 0 and math.isfinite(t.lr), "train.lr must be a positive number")
    _check(t.head_lr >= 0 and math.isfinite(t.head_lr),
           "train.head_lr must be a positive number, or 0 for train.lr")
    _check(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}")
    _check(t.lr_schedule in SCHEDULES, f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, "
           f"got '{t.lr_schedule}'")
    if t.optimizer in LORA_OPTIMIZERS:
        paired = [n for n in available_methods() if method_class(n).lora_pairs]
        _check(method_class(m.name).lora_pairs and not m.client_ranks,
               f"train.optimizer={t.optimizer} needs one LoRA (A, B) pair per layer at a single "
               f"rank, and method.name={m.name}"
               + (" with method.client_ranks" if method_class(m.name).lora_pairs else "")
               + f" does not train one — choose train.optimizer=adam, or one of {', '.join(paired)}"
               " without method.client_ranks")
    _check(0 <= t.momentum < 1, "train.momentum must be in [0, 1)")
    _check(t.micro_batch_size >= 0, "train.micro_batch_size must be ≥ 0 (0 = chosen for the device)")
    _check(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, "
           f"got '{t.precision}'")
    _check(t.ghost_clipping in GHOST_CLIPPING, f"train.ghost_clipping must be one of "
           f"{', '.join(GHOST_CLIPPING)}, got '{t.ghost_clipping}'")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size must be ≥ 1")
    _validate_task(c)
    p = c.privacy
    _check(p.epsilon > 0, "privacy.epsilon must be > 0 (or inf to turn DP off), e.g. 3")
    _check(0 < p.delta < 1, "privacy.delta must be in (0, 1), e.g. 1e-5")
    _check(p.clip > 0 and math.isfinite(p.clip), "privacy.clip must be a positive number, e.g. 1.0")
    _check(p.accountant in ACCOUNTANTS, f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}")
    _check(p.noise in NOISE, f"privacy.noise must be one of {', '.join(NOISE)} (secret: the default; "
           "seeded: reproducible, for research)")
    _check(p.center_noise > 0 and math.isfinite(p.center_noise),
           "privacy.center_noise must be a positive number, e.g. 5 (or set model.center='off')")


def _validate_secure_aggregation(c: Config) -> None:
    """What SecAgg+ needs: an aggregate computable from the weighted mean of the uploads, one
    shape of upload for every site, a bound that fixes the quantisation range, and enough sites
    per round that the mean hides each one (Flower's SecAgg+ needs at least 3 shares)."""
    from fedlora.methods import available_methods, method_class

    f, m = c.federation, c.method
    why = method_class(m.name).needs_each_upload
    summable = [n for n in available_methods() if not method_class(n).needs_each_upload]
    _check(not why, f"federation.secure_aggregation: method '{m.name}' cannot be aggregated from "
           f"a sum of uploads — {why}; set federation.secure_aggregation=false or choose one of "
           f"{', '.join(summable)}")
    _check(not m.client_ranks, "federation.secure_aggregation needs one upload shape for every "
           "site — remove method.client_ranks (or set federation.secure_aggregation=false)")
    _check(f.max_update_norm > 0, "federation.secure_aggregation needs federation.max_update_norm "
           "> 0, the bound every coordinate of an update is quantised within (e.g. 1.0; an "
           "update beyond it is an error at the site, never silently clipped)")
    per_round = f.clients_per_round or f.clients
    _check(per_round >= 3, f"federation.secure_aggregation needs at least 3 sites per round (got "
           f"{per_round}): with 2, each site learns the other's update from the mean — raise "
           "federation.clients (or federation.clients_per_round)")


def _validate_task(c: Config) -> None:
    t = c.task
    _check(t.kind in TASKS, f"task.kind must be one of {', '.join(TASKS)}, got '{t.kind}'")
    _check(t.max_new_tokens >= 1, "task.max_new_tokens must be ≥ 1, e.g. 16")
    _check(t.scorer in SCORERS, f"task.scorer must be one of {', '.join(SCORERS)}, got '{t.scorer}'")
    if t.kind != "causal":
        return
    _check(c.model.path != ModelConfig.path,
           f"model.path: {ModelConfig.path} is an encoder, not a causal LM — for task.kind=causal "
           "set model.path=SmolLM2-135M-Instruct (shipped) or a causal LM folder")
    _check(c.data.partition in ("iid", "group"),
           f"data.partition='{c.data.partition}' splits by label, and prompt/answer pairs have "
           "none — for task.kind=causal use iid or group (e.g. data.group_column=difficulty)")
    _check(c.method.head == "shared",
           "method.head='local': a causal LM has no task head to keep local — remove method.head")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------- writing


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------- run identity

EXECUTION = ("threads", "device")  # how a run computes, not what: a resume may change them


def flat_config(config: Config) -> dict[str, Any]:
    """{"seed": 0, "method.name": "ffa", ...}: every key of a resolved config."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


#: Keys added after runs were already being checkpointed, each with the value that reproduces
#: what fedlora did before it existed. At that value such a key is left out of a run's identity,
#: so a run (or a sweep) started by an older fedlora still resumes; set to anything else, it
#: counts like every other key. A new key with such a neutral value is added here.
ADDED_KEYS: dict[str, Any] = {"train.head_lr": 0.0, "train.lr_schedule": "constant"}


def run_identity(config: Config) -> dict[str, Any]:
    """What makes two runs the same run — the one definition resume, checkpoints, Flower sites
    and sweeps all use: every key of the config but `EXECUTION` (cores and device change how
    fast a run goes and, in the last bits of float sums, nothing else), and but the
    `ADDED_KEYS` left at their neutral values."""
    return {k: v for k, v in flat_config(config).items()
            if k not in EXECUTION and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}


def identity_text(config: Config) -> str:
    """`run_identity` as canonical JSON (sorted keys): equal texts, same run."""
    import json

    return json.dumps(run_identity(config), sort_keys=True, default=str)


def config_differences(a: Config, b: Config) -> list[str]:
    """`key: a's value there, b's value here` for every identity key where they differ."""
    fa, fb = run_identity(a), run_identity(b)
    return [f"{k}: {fa.get(k)!r} there, {fb.get(k)!r} here"
            for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def explain(key: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every config key, or of the keys of one section or one
    key (`key` = "privacy" or "privacy.epsilon"): the same metadata validation and
    `fedlora config` use, so the help cannot drift from the code."""
    rows = []
    for f in dataclasses.fields(Config):
        if f.name in _sections():
            for g in dataclasses.fields(_sections()[f.name]):
                rows.append((f"{f.name}.{g.name}", g))
        else:
            rows.append((f.name, f))
    table = [(name, _type_name(fld.type), _toml_value(_default(fld)), fld.metadata.get("help", ""))
             for name, fld in rows]
    if not key:
        return table
    chosen = [r for r in table if r[0] == key or r[0].startswith(key + ".")]
    if not chosen:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, [r[0] for r in table])} — "
                          "fedlora config --explain lists every key")
    return chosen


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_name(typ: Any) -> str:
    return typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))


def config_to_toml(config: Config) -> str:
    """The resolved config as TOML (round-trips through `load_config`)."""
    data = config_to_dict(config)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if math.isinf(v) and v > 0 else repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)
