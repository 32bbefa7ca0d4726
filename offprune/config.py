"""Run configuration: one frozen dataclass, validated with messages a user can act on."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from offprune.errors import UserError
from offprune.prune import DEFAULT_PRUNE_BATCH, METHODS, SCOPES, SUPERMASK_METHODS, UNMASKED
from offprune.sparse import KERNELS

# Budget profiles: steps, evaluation cadence and episodes. `paper` is the pruning paper's protocol.
PROFILES: dict[str, dict[str, int]] = {
    "quick": {"steps": 5_000, "eval_every": 1_000, "eval_episodes": 5},
    "paper": {"steps": 1_000_000, "eval_every": 5_000, "eval_episodes": 10},
}

def profile_budget(profile: str, algo: str) -> dict[str, Any]:
    """steps, eval_every, eval_episodes and algo_options (Config fields) of a budget profile for
    one algorithm: the generic profile, refined by the algorithm's own PROFILES where it has one."""
    from offprune.algos import ALGOS

    if profile not in PROFILES:
        raise UserError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
    refined = getattr(ALGOS[algo], "PROFILES", {}).get(profile, {}) if algo in ALGOS else {}
    budget = {**PROFILES[profile], "algo_options": {}} | refined
    budget["algo_options"] = tuple((k, str(v)) for k, v in budget["algo_options"].items())
    return budget


MAX_SEED = 2**32 - 1  # seeds seed numpy too, whose legacy seeding takes [0, 2**32)
MASK_TRANSFORMS = ("none", "shuffle")  # what happens to a criterion's masks before training

# The options each mask schedule uses; a run of any other method ignores them.
SCHEDULE_FIELDS = ("prune_start", "prune_end", "prune_every", "drop_fraction")
SCHEDULE_OPTIONS = {"gmp": ("prune_start", "prune_end", "prune_every"),
                    "set": ("prune_end", "prune_every", "drop_fraction"),
                    "rigl": ("prune_end", "prune_every", "drop_fraction")}
# Fields `RunConfig.ignored_options` checks: options some runs have no use for.
IGNORABLE_FIELDS = ("scope", *SCHEDULE_FIELDS, "omega", "transfer_noise")

# Fields a resumed run may change: they extend or relocate the run without changing what it is.
RESUMABLE_CHANGES = ("steps", "device", "threads", "progress")
# Fields that say where and how a run is executed, not what it computes: a study's run made with
# other values of these is still that study's run.
EXECUTION_FIELDS = ("out", "progress", "device", "threads")


@dataclass(frozen=True)
class RunConfig:
    algo: str = "bcq"  # key of offprune.algos.ALGOS
    dataset: str = "hopper-random-v5"  # dataset name (under $OFFPRUNE_DATASETS or ./datasets) or path
    prune: str = "snip"  # pruning criterion, or 'dense'
    sparsity: float = 0.9  # fraction of prunable weights removed, in [0, 1)
    scope: str = "global"  # 'global': one ranking per network (paper); 'layer': per weight matrix
    seed: int = 0
    steps: int = PROFILES["quick"]["steps"]  # gradient updates
    eval_every: int = PROFILES["quick"]["eval_every"]  # updates between evaluations (and checkpoints)
    eval_episodes: int = PROFILES["quick"]["eval_episodes"]
    prune_batch: int | None = None  # samples in the ONE pruning batch; None: SNIP 100, GraSP 200
    prune_rounds: int = 1  # scorings on the exponential schedule (iterative pruning at init); 1: single shot
    mask_transform: str = "none"  # 'shuffle': each layer's kept count at random positions (a sanity check)
    reinit: bool = False  # kept weights re-drawn from the initialiser after pruning (a sanity check)
    masks_from: str | None = None  # a run folder whose masks this run trains with (mask transfer); None: prune
    score_transfer: str | None = None  # a run folder whose scores are mixed into this run's (FSTL)
    weight_transfer: str | None = None  # a run folder whose trained weights are added to the initial ones (FTL)
    omega: float = 0.2  # weight of the transferred scores or weights
    transfer_noise: float = 1.0  # FSTL: weight of the random part of the mixed score (0: none)
    prune_start: float = 0.2  # gmp: fraction of the updates after which pruning starts
    prune_end: float = 0.8  # gmp, set, rigl: fraction of the updates after which masks stop changing
    prune_every: int = 1000  # gmp, set, rigl: updates between mask changes
    drop_fraction: float = 0.3  # set, rigl: fraction of kept weights replaced at the first change (cosine-decayed)
    env: str | None = None  # gymnasium id to evaluate in; None: from the file or the dataset name
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    threads: int | None = None  # torch intra-op threads (None: torch's default); sparse kernels: offprune.sparse.sparse_threads
    kernels: str = "auto"  # 'dense' (masked), 'sparse' (kept weights only), 'auto' (fixed rule), 'measure' (timed)
    out: str = "runs"  # results folder; this run writes to OUT/RUN_ID/
    run_id: str | None = None  # None: derived from algo, dataset, criterion, sparsity and seed
    progress: bool | None = None  # progress bar; None: only on a terminal
    sparsity_of: tuple[tuple[str, float], ...] = ()  # (network, sparsity) overriding `sparsity` for it
    algo_options: tuple[tuple[str, str], ...] = ()  # (field, value) overriding the algorithm's Config

    def validate(self) -> "RunConfig":
        from offprune.algos import ALGOS

        if self.algo not in ALGOS:
            raise UserError(f"unknown algo '{self.algo}' (choose from {', '.join(ALGOS)})")
        if self.prune not in METHODS:
            raise UserError(f"unknown prune method '{self.prune}' (choose from {', '.join(METHODS)})")
        if not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity) or not 0 <= self.sparsity < 1:
            raise UserError(f"--sparsity must be in [0, 1) (the fraction of weights removed), got {self.sparsity}")
        if self.prune == "dense" and self.sparsity > 0:
            raise UserError(f"--prune dense removes no weights; drop --sparsity {self.sparsity} or choose a criterion")
        if self.prune != "dense" and self.sparsity == 0:
            raise UserError(f"--prune {self.prune} at sparsity 0 removes nothing; use --prune dense")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope '{self.scope}' (choose from {', '.join(SCOPES)})")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be a whole number in [0, {MAX_SEED}] (numpy's seed range), got {self.seed}")
        for name in ("steps", "eval_every", "eval_episodes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not isinstance(self.prune_rounds, int) or self.prune_rounds < 1:
            raise UserError("--prune-rounds must be a whole number of at least 1")
        if self.mask_transform not in MASK_TRANSFORMS:
            raise UserError(f"unknown --mask-transform '{self.mask_transform}' (choose from {', '.join(MASK_TRANSFORMS)})")
        if self.masks_from and self.score_transfer:
            raise UserError("--masks-from takes another run's masks as they are; --score-transfer mixes scores: "
                            "choose one")
        if self.prune == "dense" and (self.mask_transform != "none" or self.reinit or self.masks_from
                                      or self.score_transfer or self.weight_transfer):
            raise UserError("--mask-transform, --reinit, --masks-from and the transfers change a pruned network; "
                            "--prune dense has none")
        if self.prune_batch is not None and self.prune_batch < 1:
            raise UserError("--prune-batch must be at least 1")
        if self.kernels not in KERNELS:
            raise UserError(f"unknown kernels '{self.kernels}' (choose from {', '.join(KERNELS)})")
        if self.prune == "small-dense" and (self.sparsity_of or self.mask_transform != "none" or self.reinit
                                            or self.masks_from or self.kernels == "sparse"):
            raise UserError("--prune small-dense trains smaller dense networks: it takes no --sparsity-of, "
                            "--mask-transform, --reinit, --masks-from or --kernels sparse")
        if self.prune in SUPERMASK_METHODS and (self.kernels == "sparse" or self.mask_transform != "none"
                                                        or self.reinit or self.masks_from or self.score_transfer
                                                        or self.weight_transfer):
            raise UserError(f"--prune {self.prune} learns its masks from frozen weights on dense kernels: it takes no "
                            "--kernels sparse, --mask-transform, --reinit, --masks-from or transfers")
        if not 0 <= self.prune_start < self.prune_end <= 1 or self.prune_every < 1 or not 0 <= self.drop_fraction <= 1:
            raise UserError("need 0 <= --prune-start < --prune-end <= 1, --prune-every >= 1 and --drop-fraction in [0, 1]")
        if self.kernels == "sparse" and self.prune == "dense":
            raise UserError("--kernels sparse needs pruned networks (sparsity > 0); use --kernels dense or auto")
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be at least 1")
        for network, value in self.sparsity_of:
            if not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
                raise UserError(f"--sparsity-of {network}={value}: sparsity must be in [0, 1)")
        if self.sparsity_of and self.prune == "dense":
            raise UserError("--sparsity-of needs a pruning criterion (--prune snip, grasp, ...), not dense")
        self.algo_config()  # unknown or malformed --algo-opt fails here, before any work
        return self

    @classmethod
    def from_profile(cls, profile: str, algo: str, algo_options: tuple[tuple[str, str], ...] = (),
                     **fields: Any) -> "RunConfig":
        """The one budget merge: the profile's steps, evaluation cadence and algorithm options for
        `algo` (as refined by the algorithm), overridden by `fields` that are not None; extra
        `algo_options` come after the profile's, so they win."""
        budget = profile_budget(profile, algo)
        values = {k: budget[k] for k in ("steps", "eval_every", "eval_episodes")}
        values.update({k: v for k, v in fields.items() if v is not None})
        return cls(algo=algo, algo_options=budget["algo_options"] + tuple(algo_options), **values)

    def algo_config(self):
        """The algorithm's Config with `algo_options` applied (values parsed by the field's type)."""
        from offprune.algos import ALGOS

        config_cls = ALGOS[self.algo].Config
        defaults = config_cls()
        fields = {f.name for f in dataclasses.fields(config_cls)}
        values = {}
        for key, text in self.algo_options:
            if key not in fields:
                raise UserError(f"--algo-opt {key}: {self.algo} has no such option (options: {', '.join(sorted(fields))})")
            values[key] = _parse_option(key, str(text), getattr(defaults, key))
        return dataclasses.replace(defaults, **values)

    def ignored_options(self, given: Iterable[str]) -> list[str]:
        """Of the fields a user set (`given`), the ones this run would silently ignore, each with
        why: a mask schedule's options without that schedule, a scope without masks, a transfer's
        weights without a transfer."""
        reasons = []
        for name in given:
            users = [method for method, options in SCHEDULE_OPTIONS.items() if name in options]
            if users and self.prune not in users:
                reasons.append(f"--{name.replace('_', '-')} applies to --prune {' / '.join(users)}, not {self.prune}")
        if "scope" in given and self.prune in UNMASKED:
            reasons.append(f"--scope spreads a sparsity over the layers; --prune {self.prune} masks no layer")
        if "omega" in given and not (self.score_transfer or self.weight_transfer):
            reasons.append("--omega weighs a transfer: it needs --score-transfer or --weight-transfer")
        if "transfer_noise" in given and not self.score_transfer:
            reasons.append("--transfer-noise weighs FSTL's random score: it needs --score-transfer")
        return reasons

    @property
    def schedule_window(self) -> tuple[int, int]:
        """The updates between which a mask schedule changes masks: prune_start and prune_end as counts."""
        return round(self.prune_start * self.steps), round(self.prune_end * self.steps)

    @property
    def pruning_batch_size(self) -> int:
        return self.prune_batch or DEFAULT_PRUNE_BATCH.get(self.prune, 100)

    @property
    def name(self) -> str:
        if self.run_id:
            return self.run_id
        scope = "" if self.scope == "global" else f"_{self.scope}"
        overrides = "".join(f"_{net}{value:g}" for net, value in self.sparsity_of)
        batch = f"_pb{self.prune_batch}" if self.prune_batch is not None and self.prune != "dense" else ""
        batch += f"_r{self.prune_rounds}" if self.prune_rounds != 1 and self.prune != "dense" else ""
        batch += "_shuffle" if self.mask_transform == "shuffle" else ""
        batch += "_reinit" if self.reinit else ""
        batch += f"_from-{Path(self.masks_from).name}" if self.masks_from else ""
        batch += f"_fstl-{Path(self.score_transfer).name}_o{self.omega:g}" if self.score_transfer else ""
        batch += f"_ftl-{Path(self.weight_transfer).name}_o{self.omega:g}" if self.weight_transfer else ""
        return (f"{self.algo}_{Path(self.dataset).stem}_{self.prune}{scope}_s{self.sparsity:g}{overrides}{batch}"
                f"_seed{self.seed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def experiment(self) -> dict:
        """`to_dict` without EXECUTION_FIELDS: what the run computes."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def differences(self, other: dict) -> list[str]:
        """Fields (other than RESUMABLE_CHANGES) whose value differs from a saved config. A field
        the saved config lacks (written before the field existed) counts as its default."""
        mine = json.loads(json.dumps(self.to_dict()))  # tuples as the saved JSON has them: lists
        defaults = json.loads(json.dumps(RunConfig().to_dict()))
        return [k for k in mine if k not in RESUMABLE_CHANGES and other.get(k, defaults[k]) != mine[k]]


def _parse_option(key: str, text: str, default: Any) -> Any:
    """An --algo-opt value, typed like the option's default: bool, int, float, str or a tuple of ints."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(int(x) for x in text.split(",") if x.strip())
        return type(default)(text)
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else (
            "comma list of integers" if isinstance(default, tuple) else type(default).__name__)
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError(f"--algo-opt {key}={text}: expected {article} {kind} (default {default!r})") from None


def parse_pairs(items: tuple[str, ...] | list[str], flag: str, kind=str) -> tuple[tuple[str, Any], ...]:
    """('a=1', 'b=2') -> (('a', kind('1')), ('b', kind('2'))) with a clear error for bad items."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"{flag} expects NAME=VALUE, got '{item}'")
        try:
            pairs.append((key.strip(), kind(value.strip())))
        except ValueError:
            raise UserError(f"{flag} {item}: '{value}' is not a valid {kind.__name__}") from None
    return tuple(pairs)


def parse_list(text: str, kind=str) -> list:
    """'a,b,c' -> [a, b, c] converted by `kind`; 'LO-HI' expands to LO..HI when kind is int."""
    items = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            if kind is int and "-" in part.lstrip("-"):
                lo, hi = (int(bound) for bound in part.split("-", 1))
                if hi < lo:
                    raise UserError(f"range '{part}' is empty (write LO-HI with LO <= HI)")
                items.extend(range(lo, hi + 1))
            else:
                items.append(kind(part))
        except ValueError:
            raise UserError(f"'{part}' is not a valid {kind.__name__}{' or range' if kind is int else ''}") from None
    return items


def _as_list(value: Any, kind) -> tuple:
    """A grid axis from a flag ('a,b', '0-4') or a config file (list, string or single value)."""
    if isinstance(value, (list, tuple)):
        return tuple(x for v in value for x in parse_list(str(v), kind))
    return tuple(parse_list(str(value), kind))


def _algo_steps(value: Any) -> tuple[tuple[str, int], ...]:
    """A config file's `algo_steps = {bc = 10000, bcq = 20000}` (or 'bc=10000,bcq=20000')."""
    if isinstance(value, dict):
        items = [f"{k}={v}" for k, v in value.items()]
    else:
        items = [part for part in str(value).split(",") if part.strip()]
    pairs = parse_pairs(items, "algo_steps", int)
    if any(steps < 1 for _, steps in pairs):
        raise UserError("algo_steps: updates must be at least 1")
    return pairs


def _algo_prune(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A config file's `algo_prune = {bc = []}`: the criteria of one algorithm ([]: its dense
    baselines only), overriding `prune` for it."""
    if not isinstance(value, dict):
        raise UserError("algo_prune: a table of algo = [criteria], e.g. algo_prune = { bc = [] }")
    return tuple((algo, tuple(_as_list(criteria, str))) for algo, criteria in value.items())


# criterion options that take the source run from a sweep's `transfer_source` (formatted per run)
TRANSFER_OPTIONS = {"masks-from": "masks_from", "fstl": "score_transfer", "ftl": "weight_transfer"}
TRANSFER_SOURCE = object()  # placeholder until the grid knows the run's seed, sparsity and algo


def criterion_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """A sweep's criterion with options after '+': 'snip+r10' (10 scoring rounds), 'random+erk'
    (a scope), 'snip+shuffle' (--mask-transform shuffle), 'snip+reinit' -> (criterion, RunConfig fields)."""
    prune, *options = entry.split("+")
    fields: dict[str, Any] = {}
    for option in options:
        if option in SCOPES:
            fields["scope"] = option
        elif option in MASK_TRANSFORMS and option != "none":
            fields["mask_transform"] = option
        elif option == "reinit":
            fields["reinit"] = True
        elif option in TRANSFER_OPTIONS:  # the source run comes from the sweep's transfer_source
            fields[TRANSFER_OPTIONS[option]] = TRANSFER_SOURCE

        elif option.startswith("r") and option[1:].isdigit() and int(option[1:]) >= 1:
            fields["prune_rounds"] = int(option[1:])
        else:
            raise UserError(f"criterion '{entry}': unknown option '{option}' (options: rN rounds, "
                            f"{', '.join(SCOPES)}, shuffle, reinit, {', '.join(TRANSFER_OPTIONS)})")
    return prune, fields


SWEEP_EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs and how to execute it. Set from `offprune sweep` flags and/or a TOML file
    with the same keys (flag names with '_' for '-'); a flag given on the command line wins."""

    algo: tuple[str, ...] = ("bc",)  # algorithms
    prune: tuple[str, ...] = ("snip", "grasp")  # criteria; a dense baseline is always added
    sparsity: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # fractions removed
    dataset: tuple[str, ...] = (RunConfig.dataset,)  # names or paths
    seeds: tuple[int, ...] = (0, 1, 2)
    scope: str = "global"  # mask scope of every run
    profile: str = "quick"  # budget profile; steps / eval_every / eval_episodes override it
    steps: int | None = None  # updates per run; None: the profile's
    algo_steps: tuple[tuple[str, int], ...] = ()  # (algo, updates) overriding `steps` for one algorithm
    algo_prune: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (algo, criteria) overriding `prune` for it; (): dense only
    # the source run of '+masks-from', '+fstl' and '+ftl' criteria: a folder, formatted per run with
    # {algo}, {seed} and {sparsity}, e.g. "runs/studies/bc_halfcheetah-expert-v5_snip_s{sparsity}_seed{seed}"
    transfer_source: str | None = None
    omega: float = 0.2  # weight of the transferred scores or weights
    eval_every: int | None = None
    eval_episodes: int | None = None
    prune_batch: tuple[int, ...] = ()  # pruning batch sizes, a grid axis; empty: SNIP 100, GraSP 200
    env: str | None = None  # gymnasium id to evaluate in; None: from each dataset
    kernels: str = "auto"  # 'auto', 'dense', 'sparse' or 'measure'
    device: str = "cpu"
    threads: int = 1  # torch threads per run (two 2-thread processes slow a 2-core machine ~10x)
    jobs: int = 2  # runs at a time (local worker processes, or Ray CPUs of a local Ray instance)
    executor: str = "local"  # 'local' processes or 'ray'
    ray_address: str | None = None  # existing Ray cluster ('auto' or host:port); None: a local instance
    out: str = "runs/sweep"  # folder of the sweep's runs
    results: str | None = None  # a study's consolidated results folder (e.g. reports/NAME): finished runs
    # are copied there as they end, and runs whose final rows it holds are skipped

    _LISTS = {"algo": str, "prune": str, "sparsity": float, "dataset": str, "seeds": int, "prune_batch": int}

    @classmethod
    def build(cls, file: str | Path | None = None, **flags: Any) -> "SweepConfig":
        """Defaults, overlaid by the TOML `file`, overlaid by `flags` (None values are ignored)."""
        values: dict[str, Any] = {}
        if file is not None:
            values.update(cls.read_file(file))
        values.update({k: v for k, v in flags.items() if v is not None})
        for key, kind in cls._LISTS.items():
            if key in values:
                values[key] = _as_list(values[key], kind)
        if "algo_steps" in values:
            values["algo_steps"] = _algo_steps(values["algo_steps"])
        if "algo_prune" in values:
            values["algo_prune"] = _algo_prune(values["algo_prune"])
        return cls(**values).validate()

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"sweep config {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"sweep config {path} is not valid TOML: {e}") from None
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key.replace("-", "_") not in known:
                raise UserError(f"unknown key '{key}' in {path} (known keys: {', '.join(known)})")
        return {k.replace("-", "_"): v for k, v in data.items()}

    def validate(self) -> "SweepConfig":
        if self.profile not in PROFILES:
            raise UserError(f"unknown profile '{self.profile}' (choose from {', '.join(PROFILES)})")
        if self.executor not in SWEEP_EXECUTORS:
            raise UserError(f"unknown executor '{self.executor}' (choose from {', '.join(SWEEP_EXECUTORS)})")
        if self.ray_address and self.executor != "ray":
            raise UserError("--ray-address needs --executor ray")
        for name in ("jobs", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"--{name} must be a whole number of at least 1")
        if any(b < 1 for b in self.prune_batch):
            raise UserError("--prune-batch must be at least 1")
        stray = [algo for algo, _ in self.algo_prune if algo not in self.algo]
        if stray:
            raise UserError(f"algo_prune names {', '.join(stray)}, not in algo ({', '.join(self.algo)})")
        return self

    def base_run(self, algo: str = "bc") -> RunConfig:
        """The RunConfig every grid point of `algo` starts from."""
        return RunConfig.from_profile(
            self.profile, algo, scope=self.scope, steps=dict(self.algo_steps).get(algo, self.steps),
            eval_every=self.eval_every, eval_episodes=self.eval_episodes, env=self.env, kernels=self.kernels,
            device=self.device, threads=self.threads, out=self.out, omega=self.omega)
