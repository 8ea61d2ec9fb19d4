"""The optimizer's data: its tunables, and the candidates, steps, measured points, choices and report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METRICS = ("cosine", "snr", "top1")
DEFAULT_RULES = ("fuse-hardswish", "fold-bn", "softmax-conv", "split-conv", "separable", "spatial-separable", "dilated",
                 "low-rank", "int8")
#: Ranks tried for rules that take one (per input channel): on YOLOv8n at budget 0.99 ranks 3 and 4 gave 60 of
#: 497 candidates, 5 of them on a conv's hull and none chosen, and are the dearest to fit (ALS).
DEFAULT_RANKS = (1, 2)
#: Ranks tried instead of ``ranks`` for rules whose rank spans the whole layer (R channels shared by all, where
#: ``ranks`` count filters per input channel): shares of the rule's full rank; for a square 3×3 conv in
#: low-rank's spatial form they cost about 1/8, 1/4, 1/2, 3/4 and 1× the MACs (the last is dropped by MAX_MAC_RATIO).
LAYER_RANK_SHARES = {"low-rank": ("1/16", "1/8", "1/4", "3/8", "1/2")}
#: Shares of a conv's output channels kept, tried for the rules that drop channels (``prune``); the most
#: aggressive first (a share that drops no channel of a narrow conv ends the list).
KEEP_SHARES = {"prune": (0.25, 0.5, 0.75)}
#: A built prefix this much slower than its predicted latency has non-additive savings: shorter ones are tried.
PREDICTION_SLACK = 1.1
#: Built prefixes whose measured speed-ups differ by less than this share count as equally fast.
SPEED_NOISE = 0.01
#: A candidate is kept only when its MACs are at most this fraction of the conv's.
MAX_MAC_RATIO = 0.8
#: A candidate layer counts as faster only when it beat the original in at least this share of the
#: interleaved pairs: a median saving that load on a shared machine can flip is no saving.
STABLE_SHARE = 0.75
#: Errors below this count as this much in saving/error ratios (exact-looking candidates).
ERROR_FLOOR = 1e-7

#: How the optimizer's int8 candidates calibrate their activation ranges (see README, "int8").
INT8_CALIBRATION = "minmax"


@dataclass
class Candidate:
    """One possible rewrite of one conv, measured alone."""

    node: str
    rule: str
    params: dict[str, Any]
    kind_after: str
    macs_before: int | None
    macs_after: int | None
    layer_ms_before: float
    layer_ms_after: float
    error: float | None = None  # model-level error with this rewrite alone (calibration inputs)
    metric: float | None = None  # the metric with this rewrite alone
    faster_share: float | None = None  # share of the interleaved pairs in which this layer beat the original
    layer_error: float | None = None  # ‖y′ − y‖² / ‖y‖² of the layer alone, on the original's activations
    estimated: bool = False  # ``error`` scaled from ``layer_error`` by the conv's judged options, not judged
    #: every node the rewrite replaces when more than the conv (prune: the conv, the per-channel ops after it,
    #: the consumer convs it refits): two candidates of different convs whose nodes overlap exclude each other
    touches: list[str] = field(default_factory=list)

    @property
    def saving_ms(self) -> float:
        return self.layer_ms_before - self.layer_ms_after

    def to_dict(self) -> dict:
        return {**asdict(self), "saving_ms": self.saving_ms}


@dataclass
class Step:
    """One move of the greedy sequence: conv ``node`` goes to ``rule``/``params``."""

    node: str
    rule: str
    params: dict[str, Any]
    saving_ms: float  # over the conv's previous option
    error: float  # likewise
    predicted_ms: float  # model latency after this step (baseline − savings so far)
    predicted_error: float  # errors so far, added


@dataclass
class Point:
    """A prefix of the sequence, built (sequential fit), judged on held-out inputs and timed."""

    steps: int
    convs: int
    predicted_ms: float  # original_ms − the steps' measured one-layer savings
    original_ms: float  # the original's median, timed interleaved with this prefix
    measured_ms: float
    speedup: float  # median over interleaved pairs of original / rewritten
    metric: float
    error: float
    passed: bool
    faster_share: float | None = None  # share of the interleaved pairs in which it beat the original
    fit: str = "alone"  # each conv fitted alone on the original's statistics, or refitted in "sequence"


@dataclass
class Choice:
    """What the optimizer did to one conv in the returned model."""

    node: str
    rule: str
    params: dict[str, Any]
    kind_after: str
    saving_ms: float
    error_alone: float | None
    notes: str = ""
    faster_share: float | None = None  # share of the interleaved pairs in which the layer beat the original
    error_estimated: bool = False  # ``error_alone`` scaled from the layer's error, not judged in the model


@dataclass
class OptimizeReport:
    model: str
    metric: str
    budget: float
    rules: list[str]
    provider: str
    threads: int | None
    calibration: str
    heldout: str
    judged: list[str]  # the tensors the metric is taken over (worst of them)
    baseline_ms: float
    predicted_ms: float
    measured_ms: float
    speedup: float
    metric_value: float
    passed: bool  # a rewritten model, within the budget and faster than the original, is returned
    chosen: list[Choice] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    sequence: list[Step] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    outputs: dict[str, dict] = field(default_factory=dict)  # held-out metrics per output (final model)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the notes that say what the result risks (the model's load warnings, too few or alike samples): the CLI
    #: prints these as warnings and the rest as notes
    warnings: list[str] = field(default_factory=list)
    quantile: float | None = None  # the budget holds on this share of the held-out samples (None: on every one)
    excluded: dict[str, list[dict]] = field(default_factory=dict)  # per judged tensor: samples left out, and why
    timed_out: bool = False  # the time budget ended the run before the search did
    #: held-out samples' distance to the nearest calibration sample over calibration samples' to each other
    #: (medians, in the model's features; over 2: the calibration set does not cover the held-out one)
    coverage: float | None = None
    #: the value of the metric the search held on the held-out samples: ``budget``, or stricter when they were
    #: split off the calibration set (:data:`convgraph.optimize.samples.SPLIT_MARGIN`)
    held_budget: float | None = None
    #: convs the exact pre-pass rules (fuse-hardswish, fold-bn, softmax-conv, split-conv) rewrote before the search, in every result
    folded: int = 0

    @property
    def held_on(self) -> str:
        return "worst sample" if self.quantile is None else f"{self.quantile:g} of the samples"

    @property
    def budget_text(self) -> str:
        if self.held_budget is None or self.held_budget == self.budget:
            return f"budget {self.budget:g}"
        return f"budget {self.budget:g}, held at {self.held_budget:.6g} on samples split off the calibration set"

    @property
    def best_metric(self) -> float | None:
        """The best held-out metric of any rewritten prefix built (None when none was built)."""
        return max((p.metric for p in self.points), default=None)

    @property
    def best_speedup(self) -> float | None:
        """The best measured speed-up of any prefix built, within the budget or not."""
        return max((p.speedup for p in self.points), default=None)

    def reached(self) -> str:
        """What the search got to, for a run that did not meet its budget."""
        if not self.points:
            return ("no rewrite was built: " + ("the time budget ran out first" if self.timed_out else
                                                 "no candidate saves measured time (in enough interleaved pairs)"))
        fast = max(self.points, key=lambda p: p.speedup)
        return (f"best held-out {self.metric} of a rewritten model {self.best_metric:.6g} ({self.budget_text}); "
                f"best speed-up {self.best_speedup:.2f}× (at {self.metric} {fast.metric:.6g})")

    def deciding(self) -> tuple[str, dict] | None:
        """The judged tensor whose worst held-out sample gave ``metric_value``, with its figures."""
        return min(self.outputs.items(), key=lambda kv: (kv[1].get("distribution") or {}).get("min") or 2.0,
                   default=None)

    @property
    def decided_by(self) -> str | None:
        """The tensor, or the part of one (an output split by scale), whose worst held-out sample gave
        ``metric_value``."""
        worst = self.deciding()
        return None if worst is None else worst[1].get("decided_by") or worst[0]

    def summary(self) -> str:
        if not self.passed:
            return f"no faster model within the budget: {self.reached()}"
        folds = f"{self.folded} conv(s) rewritten exactly first, " if self.folded else ""
        return (f"{folds}{len(self.chosen)} conv(s) rewritten: {self.baseline_ms:.2f} ms → {self.measured_ms:.2f} ms "
                f"measured ({self.speedup:.2f}×; predicted {self.predicted_ms:.2f} ms), held-out {self.metric} "
                f"{self.metric_value:.6g} on the {self.held_on}{f' of {self.decided_by}' if self.decided_by else ''} "
                f"({self.budget_text}): PASS")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d.update(summary=self.summary(), best_metric=self.best_metric, best_speedup=self.best_speedup,
                 decided_by=self.decided_by)
        return d
