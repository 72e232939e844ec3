"""The errors that mean "your input is wrong" (printed as one line), as opposed to bugs."""

from efficientllm.architecture import ArchitectureError
from efficientllm.config import ConfigError
from efficientllm.data import DataError
from efficientllm.distributed import LaunchError
from efficientllm.evaluation import EvaluationError
from efficientllm.interop.errors import ExportError, ModelImportError
from efficientllm.training.checkpoint import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (
    ArchitectureError, ConfigError, DataError, LaunchError, CheckpointError, ExportError, ModelImportError,
    EvaluationError,
)
