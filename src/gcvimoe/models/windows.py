"""Cutting a stage's feature map into attention windows and back, with the padding and masks uneven maps need."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['WindowLayout']


class WindowLayout:
    """How a stage's feature map ``[b, c, H, W]`` is cut into windows: sizes, padding, and the masks that padding needs.

    Token order inside the stage is window-major per image: ``[b, windows * n, c]``, so ``view(b * windows, n, c)``
    gives the attention batch without a copy.
    """

    def __init__(self, feat_size: Tuple[int, int], window_size: Tuple[int, int], device: torch.device):
        height, width = feat_size
        # a window never exceeds the map; a map the window does not divide is padded at the bottom/right
        self.window = (min(window_size[0], height), min(window_size[1], width))
        self.feat_size = (height, width)
        self.padded_size = (
            math.ceil(height / self.window[0]) * self.window[0],
            math.ceil(width / self.window[1]) * self.window[1],
        )
        self.grid = (self.padded_size[0] // self.window[0], self.padded_size[1] // self.window[1])
        self.num_windows = self.grid[0] * self.grid[1]
        self.tokens_per_window = self.window[0] * self.window[1]
        self.is_padded = self.padded_size != self.feat_size
        self.key_mask = None  # [w, 1, 1, n], -inf on padded keys
        self.valid_index = None  # [valid tokens] positions of real tokens in window order
        if self.is_padded:
            valid = torch.zeros(self.padded_size, dtype=torch.bool, device=device)
            valid[:height, :width] = True
            valid = self._to_windows(valid[None, None]).view(-1)  # [w * n]
            self.valid_index = valid.nonzero().squeeze(1)
            self.key_mask = torch.zeros(valid.shape, device=device).masked_fill(~valid, float('-inf'))
            self.key_mask = self.key_mask.view(self.num_windows, 1, 1, self.tokens_per_window)

    def _to_windows(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, c, Hp, Wp]`` -> ``[b, w * n, c]`` (one copy)."""
        b, c = x.shape[0], x.shape[1]
        (gh, gw), (wh, ww) = self.grid, self.window
        x = x.view(b, c, gh, wh, gw, ww).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, self.num_windows * self.tokens_per_window, c)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, c, H, W]`` -> ``[b, w * n, c]``, zero-padding the map first when needed."""
        if self.is_padded:
            x = F.pad(x, (0, self.padded_size[1] - self.feat_size[1], 0, self.padded_size[0] - self.feat_size[0]))
        return self._to_windows(x)

    def reverse(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, w * n, c]`` -> ``[b, c, H, W]`` (one copy), dropping padding."""
        b, c = x.shape[0], x.shape[2]
        (gh, gw), (wh, ww) = self.grid, self.window
        x = x.view(b, gh, gw, wh, ww, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, *self.padded_size)
        if self.is_padded:
            x = x[:, :, :self.feat_size[0], :self.feat_size[1]].contiguous()
        return x

    def window_batch_mask(self, batch_size: int) -> Optional[torch.Tensor]:
        """The key mask repeated for every image: ``[b*w, 1, 1, n]``."""
        if self.key_mask is None:
            return None
        return self.key_mask.repeat(batch_size, 1, 1, 1)
