"""Reading sharded training checkpoints (``RUN/last/``, ``RUN/best/``) in one process.

Expert-parallel runs save with ``torch.distributed.checkpoint`` (DCP): every process writes its own experts and
optimiser state into one folder, beside DCP's ``.metadata`` index, and the first process adds ``training.pth``, the
training state without tensors that DCP holds (the names of a file checkpoint, less ``state_dict``,
``ema_state_dict`` and the optimiser's tensors). DCP keys are ``state_dict.<name>``, ``ema_state_dict.<name>`` and
``optimizer.<parameter name>.<state name>``, each with its whole shape over all processes, so any number of
processes (or one) reads them back (:mod:`gcvimoe.train.distributed` reshards them).

Nothing is loaded with pickle's full power: tensors are read by ``torch.load(weights_only=True)``, ``training.pth``
too, and DCP's ``.metadata`` (a pickle) by an unpickler that builds DCP's own index classes only.
"""
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from gcvimoe.errors import GcvimoeError, first_line

TRAINING_FILE = 'training.pth'
METADATA_FILE = '.metadata'
WEIGHT_PREFIXES = ('state_dict.', 'ema_state_dict.')

_ALLOWED = {
    'torch.distributed.checkpoint.metadata': {
        'Metadata', 'MetadataIndex', 'ChunkStorageMetadata', 'TensorStorageMetadata', 'TensorProperties',
        'BytesStorageMetadata', 'StorageMeta', '_MEM_FORMAT_ENCODING'},
    'torch.distributed.checkpoint.filesystem': {'_StorageInfo'},
    'torch.serialization': {'_get_layout'},
    'torch': {'Size'},
    'pathlib': {'Path', 'PosixPath', 'PurePosixPath', 'WindowsPath', 'PureWindowsPath'},
    'collections': {'OrderedDict'},
}


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's index classes, torch sizes and dtypes, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (module == 'torch' and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'{module}.{name} is not part of a checkpoint index')


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the index read by :class:`_IndexUnpickler` (tensors are read ``weights_only``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            metadata = _IndexUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise GcvimoeError(f"cannot read the index {path} of a sharded checkpoint ({e}); resume from another "
                               f"checkpoint") from None
        if not isinstance(metadata, Metadata):
            raise GcvimoeError(f"{path} is not the index of a sharded checkpoint; resume from another checkpoint")
        if getattr(metadata, 'storage_meta', None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded_checkpoint(path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (DCP's index and ``training.pth``)."""
    path = Path(path)
    return path.is_dir() and (path / TRAINING_FILE).is_file() and (path / METADATA_FILE).is_file()


def read_training_state(folder) -> Dict[str, Any]:
    """``training.pth`` of a sharded checkpoint: everything but the tensors DCP holds."""
    path = Path(folder) / TRAINING_FILE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            state = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception:  # torch raises many types for a damaged file
        raise GcvimoeError(f"cannot read {path} (not a PyTorch file, or a damaged one); resume from another "
                           f"checkpoint") from None
    if not isinstance(state, dict) or not {'model_name', 'model_args'} <= state.keys():
        raise GcvimoeError(f"{path} is not the training state of a gcvimoe sharded checkpoint")
    return state


def tensor_index(folder) -> Dict[str, TensorStorageMetadata]:
    """Every tensor of a sharded checkpoint under its DCP key, with its whole shape and dtype."""
    metadata = SafeFileSystemReader(str(folder)).read_metadata()
    return {key: value for key, value in metadata.state_dict_metadata.items()
            if isinstance(value, TensorStorageMetadata)}


def load_whole(folder, prefixes: Iterable[str] = WEIGHT_PREFIXES) -> Dict[str, torch.Tensor]:
    """The tensors under ``prefixes`` with every shard put together, read in this process alone (no collective)."""
    prefixes = tuple(prefixes)
    targets = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in tensor_index(folder).items() if key.startswith(prefixes)}
    try:
        with warnings.catch_warnings():  # DCP's note that it reads in one process, which is the intent here
            warnings.simplefilter('ignore')
            dcp.load(targets, storage_reader=SafeFileSystemReader(str(folder)), no_dist=True)
    except GcvimoeError:
        raise
    except Exception as e:  # DCP wraps a missing or damaged shard file in its own error types
        raise GcvimoeError(f"cannot read the sharded checkpoint {folder} ({first_line(e, 160)}); resume from another "
                           f"checkpoint") from None
    return targets


def read_sharded_checkpoint(folder) -> Dict[str, Any]:
    """A sharded checkpoint as a file checkpoint's dict: the training state with ``state_dict`` (and
    ``ema_state_dict``) holding every expert. For exports and evaluation; training resumes shard by shard."""
    state = read_training_state(folder)
    tensors = load_whole(folder)
    for prefix in WEIGHT_PREFIXES:
        part = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if part:
            state[prefix[:-1]] = part
    if 'state_dict' not in state:
        raise GcvimoeError(f"the sharded checkpoint {folder} holds no weights; resume from another checkpoint")
    return state
