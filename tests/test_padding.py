"""pad_rows: the one padding helper of the collator, the chat engine and the cached-hidden-state training."""

import pytest
import torch

from peft_deltamem.padding import pad_rows


def test_right_padding_of_token_rows():
    ids, mask = pad_rows([[5, 6, 7], [8]], value=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_left_padding_ends_every_row_at_the_last_position():
    ids, mask = pad_rows([[5, 6, 7], [8]], value=2, side="left")
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_empty_rows_are_all_padding(side):
    ids, mask = pad_rows([[], [4, 5]], value=-100, side=side)
    assert ids[0].tolist() == [-100, -100] and mask[0].tolist() == [0, 0]
    ids, mask = pad_rows([[], []], value=-1, side=side, multiple_of=4)
    assert ids.shape == mask.shape == (2, 0)


def test_no_rows():
    ids, mask = pad_rows([], value=3)
    assert ids.shape == mask.shape == (0, 0) and ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize(("longest", "multiple", "width"), [(5, 4, 8), (8, 4, 8), (5, None, 5), (1, 4, 4)])
def test_multiple_of_rounds_the_width_up(longest, multiple, width):
    ids, mask = pad_rows([[1] * longest, [1]], value=0, side="left", multiple_of=multiple)
    assert ids.shape == mask.shape == (2, width)
    assert int(mask[0].sum()) == longest


def test_tensor_rows_keep_dtype_and_trailing_shape():
    rows = [torch.ones(3, 4, dtype=torch.float64), torch.full((1, 4), 2.0, dtype=torch.float64)]
    x, mask = pad_rows(rows, side="left")
    assert x.dtype == torch.float64 and x.shape == (2, 3, 4) and mask.dtype == torch.long
    assert torch.equal(x[1], torch.tensor([[0.0] * 4, [0.0] * 4, [2.0] * 4], dtype=torch.float64))
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_refuses_an_unknown_side():
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        pad_rows([[1]], side="center")
