"""Preemption-safe training: an epoch resumed at any batch sees the same images, and a run stopped mid-epoch by a
signal or a save interval, then resumed, ends bitwise equal to an uninterrupted one."""
import pytest
import torch

from gcvimoe.data import batches_per_epoch, build_transform, create_dataset, create_loader, resolve_data_config, set_epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_started_at_a_batch_sees_the_same_augmented_images(workers):
    data_cfg = resolve_data_config("digits", img_size=16)
    dataset = create_dataset(data_cfg, "train", build_transform(data_cfg, is_training=True, scale=(0.5, 1.0),
                                                                  hflip=0.5))
    loader = create_loader(dataset, batch_size=64, is_training=True, workers=workers, seed=3)
    set_epoch(loader, 2, seed=3)
    torch.manual_seed(0)
    whole = [(images.clone(), targets.clone()) for images, targets in loader]
    set_epoch(loader, 2, seed=3, start_batch=5)
    torch.manual_seed(1)  # the caller's stream does not matter: each sample has its own
    rest = list(loader)
    assert len(rest) == len(whole) - 5 and batches_per_epoch(loader) == len(whole)
    for (images, targets), (expected_images, expected_targets) in zip(rest, whole[5:]):
        assert torch.equal(targets, expected_targets) and torch.equal(images, expected_images)
    set_epoch(loader, 3, seed=3)
    assert not torch.equal(next(iter(loader))[0], whole[0][0])  # another epoch, other crops
