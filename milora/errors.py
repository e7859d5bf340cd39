"""Typed errors. Every message says what was wrong, what was seen, what was expected and,
where there is one, how to fix it. Free of torch (the runtime raises these too)."""


class MiloraError(Exception):
    """Base class of every error milora raises on bad input."""


class ConfigError(MiloraError, ValueError):
    """A MiloraConfig (or its JSON form) holds an invalid value."""


class UnsupportedModelError(MiloraError):
    """The base model's architecture or module layout is not one milora can adapt."""


class AdapterFormatError(MiloraError):
    """An adapter directory is missing a file, holds a corrupt file, or a tensor is missing
    or has the wrong shape."""


class BaseMismatchError(MiloraError):
    """An adapter was trained for a base model whose dimensions differ from this one."""


class AdapterImportError(MiloraError):
    """A PEFT adapter or reference-code checkpoint cannot be imported."""


class UnsafeCheckpointError(AdapterImportError):
    """A pickled checkpoint refers to code outside the allowlist; it was not executed."""


class RoutingError(MiloraError):
    """Routing inputs are inconsistent (e.g. a row with no prompt token, a routing state
    whose shape does not match the batch)."""


class AssetError(MiloraError):
    """A packaged asset (the SmolLM2 GGUF, a built-in dataset) is missing or unreadable."""


class DataError(MiloraError, ValueError):
    """Training or evaluation data is malformed (a bad JSONL line, a missing field, an unknown
    task name, an empty split)."""


class TrainingError(MiloraError):
    """A training run cannot start or resume (bad hyper-parameters, a checkpoint that does not
    match the run)."""


class ExportError(MiloraError):
    """milora-export cannot proceed: bad inputs or options (OUT_DIR not empty, too many
    tenants for the slots, unknown adapter kind, ...)."""


class ValidationError(MiloraError):
    """An exported graph disagrees with the PyTorch reference beyond the tolerance table."""


class TenantError(MiloraError):
    """Unknown tenant, a tenant still in use, or no adapter slot can be freed."""


class ManifestError(MiloraError):
    """An exported directory is missing, incomplete, tampered with, or of another version."""


class CapacityError(MiloraError):
    """A request can never fit (prompt longer than the context, KV budget too small)."""


class RequestError(MiloraError, ValueError):
    """A request is malformed: an empty prompt, token ids outside the vocabulary, a tenant slot
    outside the export's slots, contradictory prompt arguments."""


class OverloadError(MiloraError):
    """The runtime's queue is full: retry later (a server answers 429 / 503 with Retry-After)."""


class NumericalError(MiloraError):
    """A request's own computation produced NaN or inf (its tenant's adapter or its input is
    corrupt). Only that request fails; every other row of the batch is unaffected."""


class NonFiniteError(AdapterFormatError):
    """An adapter or slot pack holds NaN or infinite values (LoRA A/B, router weights, pooler,
    activation coefficients, noise weights). `problems` lists (tensor, NaN, +inf, -inf, size)."""

    def __init__(self, message: str, problems: list[tuple[str, int, int, int, int]] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class UsageError(MiloraError):
    """A command line is missing an argument, holds an unknown flag, a contradiction or a bad value."""


class WriteError(MiloraError):
    """An output could not be written (read-only location, full disk, ...); nothing half-written
    was left behind."""


class SlotLoadError(TenantError):
    """A registered tenant's pack or adapter could not be loaded into a slot (changed on disk since
    it was added: corrupt, non-finite, ...). Only that tenant's requests fail; `cause` holds the
    underlying error (e.g. a NonFiniteError)."""

    def __init__(self, message: str, cause: MiloraError | None = None):
        super().__init__(message)
        self.cause = cause


class DependencyError(MiloraError):
    """An optional dependency a feature needs is missing or unusable (TensorRT, triton, a CUDA
    device); the message names what to install."""


class EngineBuildError(MiloraError):
    """A TensorRT engine cannot be built or loaded: an option the graph cannot take (int8 without
    Q/DQ nodes), an ONNX parse failure, a profile outside the model's limits."""


class QuantizeError(MiloraError):
    """milora-quantize cannot proceed: a bad option, a source export it cannot quantize (already
    quantized, float16, a precision its target cannot run), calibration data that is unusable."""


class AgreementError(QuantizeError):
    """A quantized export's routing agreement with its source falls below the threshold; nothing
    was written (unless forced). `report` holds the agreement report's numbers."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
