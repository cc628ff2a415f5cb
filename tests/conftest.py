import os

import pytest
import torch

if not torch.cuda.is_available():
    # the triton expert path's kernels run through Triton's interpreter here; it is read when Triton is imported
    os.environ.setdefault('TRITON_INTERPRET', '1')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Validation and prediction run in this process: one thread keeps them fast when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The default generated image folder (``train/``, ``val/``), shared and read-only: a test that writes copies it."""
    from helpers import make_image_folder  # here, not above: it imports Triton, which must see TRITON_INTERPRET first
    return make_image_folder(tmp_path_factory.mktemp("images"))
