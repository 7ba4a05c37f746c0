"""What a benchmark run covers: model shapes × methods, steps, repeats and time budget, as named presets.

A :class:`Preset` lists :class:`Shape` objects (model, batch, sequence length, padding, and which methods
run on it) plus the step counts and budget; :func:`build_preset` applies the command-line overrides and
:func:`plan` orders the runs so every shape gets one run of each method before the next repeat
(A B C ... A B C ...), which spreads a noisy machine's load over all methods alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from benchmarks.methods import METHODS, ROWS
from benchmarks.precision import bf16_preset


@dataclass
class Shape:
    model: str
    batch: int
    seq: int
    padding: str  # movie | none
    layers: int | None = None
    pretrained: bool = False
    methods: list[str] = field(default_factory=lambda: list(ROWS))
    dtype: str = "float32"  # the dtype the model is loaded in (bfloat16: see benchmarks.precision)

    @property
    def key(self) -> str:
        layers = f" ({self.layers} layers)" if self.layers else ""
        pad = "movie-padded" if self.padding == "movie" else "unpadded"
        dtype = f" {self.dtype}" if self.dtype != "float32" else ""
        return f"{self.model}{layers} bs{self.batch}x{self.seq} {pad}{dtype}"


@dataclass
class Preset:
    shapes: list[Shape]
    steps: int
    warmup: int
    repeats: int
    budget_min: float
    basis_steps: int = 8
    basis_micro_batch: int | None = 4
    basis_sweep: list = field(default_factory=list)  # micro-batch settings measured alone (0: whole batches)
    energy: str = "auto"  # auto | run | cached | skip
    profile_method: str | None = None
    steps_override: dict = field(default_factory=dict)  # method -> timed steps
    notes: list[str] = field(default_factory=list)


ALL = list(METHODS)
LLAMA_METHODS = ["full", "lora", "meprop", "sparsegrad", "sparsegrad_regular", "leading_block"]

PRESETS = {
    "quick": Preset(
        shapes=[Shape("minilm", 16, 128, "movie", pretrained=True)], steps=2, warmup=1, repeats=2,
        budget_min=10, energy="skip",
    ),
    "cpu": Preset(
        shapes=[Shape("bert-base", 16, 128, "movie", methods=ALL),
                Shape("bert-base", 16, 128, "none", methods=["full", "lora", "leading_block", "sparsegrad"])],
        steps=2, warmup=1, repeats=2, budget_min=24, energy="auto", profile_method="sparsegrad",
        basis_sweep=[0, 4, 3, 2],
        steps_override={"sparsegrad_regular": 1},
        notes=[
            "CPU preset (2 cores: a bert-base step takes seconds): bert-base bs16x128 only, 2 timed steps after "
            "1 warm-up (1 timed step for the 3-product layer), 2 alternating repeats; the unpadded shape skips "
            "meprop and the 3-product layer (both dominated by dense per-token work measured on the padded shape).",
            "Skipped on CPU (run by --preset gpu): roberta-base, batch 32, the LLaMA shapes; runs that would "
            "overrun the 21-minute run budget (25 minutes with the top-k location measurement) are skipped and "
            "listed below.",
        ],
    ),
    "gpu": Preset(
        shapes=[Shape("roberta-base", 32, 128, "movie"),
                Shape("llama2-7b", 4, 512, "none", layers=4, methods=LLAMA_METHODS),
                Shape("smollm2", 8, 512, "none", methods=LLAMA_METHODS),
                Shape("roberta-base", 32, 128, "none", methods=[m for m in ALL if m != "sparsegrad_regular"]),
                Shape("bert-base", 16, 128, "movie"),
                Shape("roberta-base", 16, 128, "movie")],
        steps=10, warmup=3, repeats=2, budget_min=6.5, energy="skip",  # basis target is a 2-CPU-core one
        notes=[
            "GPU preset, most important shapes first: roberta-base bs32x128 padded like a GLUE task (the paper's "
            "Table 3 setting), a LLaMA-2-7B-shaped model truncated to 4 layers (blocks 0 and 3 trained, the paper's "
            "every-3rd-block rule, MLP only) bs4x512 packed, the SmolLM2-135M shape (30 layers) bs8x512 packed, "
            "roberta-base bs32 unpadded, bert-base bs16 padded, roberta-base bs16 padded; random float32 weights "
            "(no TF32); 10 timed steps after 3 warm-up. Runs go repeat by repeat, so every shape gets one run of "
            "each method before the second, alternating repeat; runs that would overrun the budget are skipped.",
        ],
    ),
}

PRESETS["bf16"] = bf16_preset(Preset, Shape)


def plan(preset: Preset) -> list[tuple[int, Shape, str]]:
    """Runs in order: repeat-major, then shape, then method (A B C ... A B C ...)."""
    return [(r, s, m) for r in range(preset.repeats) for s in preset.shapes for m in s.methods]



def build_preset(args) -> tuple[str, Preset]:
    name = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    base = PRESETS[name]
    preset = Preset(shapes=[Shape(**asdict(s)) for s in base.shapes], steps=base.steps, warmup=base.warmup,
                    repeats=base.repeats, budget_min=base.budget_min, basis_steps=base.basis_steps,
                    basis_micro_batch=base.basis_micro_batch, basis_sweep=list(base.basis_sweep),
                    energy=base.energy, profile_method=base.profile_method,
                    steps_override=dict(base.steps_override), notes=list(base.notes))  # fmt: skip
    if args.models or args.batch_sizes or args.paddings or args.seq or args.layers:
        models = args.models.split(",") if args.models else sorted({s.model for s in preset.shapes})
        bss = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else sorted({s.batch for s in preset.shapes})
        pads = args.paddings.split(",") if args.paddings else ["movie"]
        seq = args.seq or 128
        preset.shapes = [Shape(m, b, seq, p, layers=args.layers, pretrained=m in ("minilm", "smollm2"))
                         for m in models for b in bss for p in pads]  # fmt: skip
        preset.notes = [f"Custom grid: models {models}, batch sizes {bss}, paddings {pads}, sequence {seq}."]
        preset.steps_override = {}
    if args.methods:
        methods = args.methods.split(",")
        bad = [m for m in methods if m not in ROWS]
        if bad:
            raise SystemExit(f"unknown method(s) {bad}; valid: {', '.join(ROWS)}")
        for s in preset.shapes:
            s.methods = [m for m in methods]
    if args.basis_sweep is not None:
        preset.basis_sweep = [int(x) for x in args.basis_sweep.split(",") if x.strip()]
    if args.basis_micro_batch is not None:
        preset.basis_micro_batch = args.basis_micro_batch or None
    for attr in ("steps", "warmup", "repeats", "basis_steps"):
        if getattr(args, attr) is not None:
            setattr(preset, attr, getattr(args, attr))
    if args.steps is not None:
        preset.steps_override = {}
    if args.budget_min is not None:
        preset.budget_min = args.budget_min
    if args.energy is not None:
        preset.energy = args.energy
    if args.no_profile:
        preset.profile_method = None
    return name, preset

