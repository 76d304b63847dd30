"""The engine's small building blocks, checked directly.

- The per-cluster gradient buffer: its aligned, zero-padded rows, the ``.grad`` views that
  follow each parameter's memory order and offset, pointing the gradients at a row (zeroed or
  not), recognising the same parameters again, and giving them their own copies back.
- Cutting a batch: its leading size, mapping over dicts / lists / tuples / namedtuples while
  keeping their types, the checks that refuse per-sample values that would not be cut, and
  slicing or gathering rows.
- The collectives' switch: when the sum-reduction is on, and that it is the identity for a
  group of one rank.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from antdiff.engine.batch import (
    batch_size,
    check_batch,
    map_batch,
    slice_batch,
    take_batch,
)
from antdiff.engine.buffer import ROW_ALIGN, GradBuffer, dense_layout, param_view, unwrap
from antdiff.engine.distributed import Comm


# -- unwrap ---------------------------------------------------------------------------------------
def test_unwrap_returns_the_model_a_data_parallel_wrapper_holds():
    inner = nn.Linear(2, 2)
    assert unwrap(nn.DataParallel(inner)) is inner


def test_unwrap_keeps_a_plain_model_and_its_child_named_module():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    m = Holder()
    assert unwrap(m) is m


def test_unwrap_looks_through_a_compiled_wrapper_only_for_a_data_parallel_model():
    inner = nn.Linear(2, 2)
    compiled = nn.Module()
    compiled._orig_mod = nn.DataParallel(inner)
    assert unwrap(compiled) is inner
    plain = nn.Module()
    plain._orig_mod = nn.Linear(2, 2)
    assert unwrap(plain) is plain


# -- dense_layout / param_view --------------------------------------------------------------------
def test_dense_layout_accepts_every_gapless_order_and_refuses_gaps_and_overlaps():
    assert dense_layout(torch.empty(3, 4))
    assert dense_layout(torch.empty(3, 4).t())
    assert dense_layout(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert dense_layout(torch.tensor(1.0))
    assert not dense_layout(torch.empty(3, 8)[:, :4])  # a gap after each row
    assert not dense_layout(torch.empty(3, 1).expand(3, 4))  # overlapping elements
    assert not dense_layout(torch.empty(12).as_strided((3, 4), (2, 1)))  # rows overlap


def test_param_view_takes_the_elements_at_its_offset_in_the_parameters_shape():
    rows = torch.arange(40.0).view(2, 20)
    p = torch.empty(2, 3)
    v = param_view(rows, 5, p)
    assert v.shape == (2, 2, 3) and v[1].is_contiguous() and v.stride() == (20, 3, 1)
    assert torch.equal(v[1].flatten(), torch.arange(25.0, 31.0))
    v1 = param_view(rows[1], 5, p)
    assert v1.shape == (2, 3) and torch.equal(v1.flatten(), torch.arange(25.0, 31.0))
    v1.fill_(-1)  # a view: writes reach the rows
    assert bool((rows[1, 5:11] == -1).all()) and rows[1, 11] == 31 and rows[1, 4] == 24


def test_param_view_lays_a_channels_last_parameter_out_in_its_memory_order():
    rows = torch.arange(2 * 64.0).view(2, 64)[:, :40]  # padded rows: stride 64, not 40
    p = torch.empty(2, 3, 2, 2).to(memory_format=torch.channels_last)
    v = param_view(rows, 8, p)
    assert v.shape == (2, 2, 3, 2, 2) and v.stride() == (64, *p.stride())
    assert v[1].is_contiguous(memory_format=torch.channels_last)
    # element-by-element in memory: the view's i-th element in memory order is rows[.., 8 + i]
    assert v.data_ptr() == rows[:, 8].data_ptr()
    torch.testing.assert_close(v[1].permute(0, 2, 3, 1).flatten(), rows[1, 8:32])


def test_param_view_of_a_transposed_and_a_zero_dim_parameter():
    rows = torch.arange(16.0)
    p = torch.empty(3, 2).t()  # [2, 3] with strides (1, 2)
    v = param_view(rows, 1, p)
    assert v.shape == (2, 3) and v.stride() == (1, 2)
    assert torch.equal(v.t().flatten(), torch.arange(1.0, 7.0))
    s = param_view(torch.arange(8.0).view(2, 4), 3, torch.tensor(0.0))
    assert s.shape == (2,) and torch.equal(s, torch.tensor([3.0, 7.0]))


# -- GradBuffer -----------------------------------------------------------------------------------
def _net(*sizes: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])


@pytest.mark.parametrize("P,width", [(1, 16), (15, 16), (16, 16), (17, 32), (30, 32), (32, 32)])
def test_grad_buffer_rows_are_the_smallest_aligned_width(P, width):
    params = [nn.Parameter(torch.randn(P))]
    buf = GradBuffer(params, 3)
    assert buf.P == P and buf.base.shape == (3, width) and buf.J.shape == (3, P)
    assert width % ROW_ALIGN == 0
    assert buf.base.dtype == torch.float32 and bool((buf.base == 0).all())
    assert buf.J.data_ptr() == buf.base.data_ptr() and buf.J.stride() == (width, 1)
    buf.J.fill_(1.0)
    assert bool((buf.base[:, P:] == 0).all()) and int(buf.base.sum()) == 3 * P


def test_grad_buffer_keeps_the_parameters_dtype_and_skips_frozen_ones():
    model = _net(3, 4, 2).double()
    model[0].bias.requires_grad_(False)
    buf = GradBuffer(model.parameters(), 2)
    assert buf.params == [model[0].weight, model[1].weight, model[1].bias]
    assert buf.numels == [12, 8, 2] and buf.P == 22 and buf.J.dtype == torch.float64


def test_grad_buffer_refuses_a_model_without_trainable_parameters():
    model = _net(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradBuffer(model.parameters(), 2)


def test_grad_buffer_refuses_mixed_dtypes_and_names_them():
    model = _net(2, 2)
    model[0].bias.data = model[0].bias.data.double()
    with pytest.raises(ValueError, match=r"one dtype and device.*torch.float32.*torch.float64"):
        GradBuffer(model.parameters(), 2)


def test_point_grads_at_makes_each_grad_its_slice_of_that_row():
    model = _net(3, 4, 2)
    buf = GradBuffer(model.parameters(), 3)
    buf.J.copy_(torch.arange(3 * buf.P, dtype=torch.float32).view(3, buf.P))
    buf.point_grads_at(2, zero=False)
    o = 0
    for p in buf.params:
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad.flatten(), buf.J[2, o : o + p.numel()])
        o += p.numel()
    model[1].bias.grad.fill_(-5.0)  # the grads are views: writes land in row 2
    assert bool((buf.J[2, buf.P - 2 :] == -5).all())


def test_point_grads_at_zeroes_only_that_row_unless_told_not_to():
    buf = GradBuffer(_net(3, 4).parameters(), 3)
    buf.J.fill_(1.0)
    buf.point_grads_at(1)
    assert bool((buf.J[1] == 0).all())
    assert bool((buf.J[0] == 1).all()) and bool((buf.J[2] == 1).all())
    buf.point_grads_at(2, zero=False)
    assert all(bool((p.grad == 1).all()) for p in buf.params)
    assert bool((buf.base[:, buf.P :] == 0).all())


def test_backward_accumulates_into_the_row_the_grads_point_at():
    model = _net(3, 2)
    buf = GradBuffer(model.parameters(), 2)
    x = torch.randn(4, 3)
    buf.point_grads_at(1)
    model(x).sum().backward()
    assert bool((buf.J[0] == 0).all()) and bool((buf.J[1] != 0).any())
    ref = _net(3, 2)
    ref.load_state_dict(model.state_dict())
    ref(x).sum().backward()
    want = torch.cat([p.grad.flatten() for p in ref.parameters()])
    torch.testing.assert_close(buf.J[1], want)


def test_grad_buffer_views_of_a_channels_last_model_keep_its_layout():
    model = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    buf = GradBuffer(model.parameters(), 2)
    buf.point_grads_at(1)
    assert model.weight.grad.stride() == model.weight.stride()
    assert model.weight.grad.is_contiguous(memory_format=torch.channels_last)
    buf.J[1].fill_(3.0)
    buf.detach_grads()
    assert model.weight.grad.stride() == model.weight.stride()


def test_matches_the_same_trainable_parameters_of_the_same_dtype_only():
    model = _net(3, 4, 2)
    buf = GradBuffer(model.parameters(), 2)
    assert buf.matches(model.parameters())
    assert not buf.matches(list(model.parameters())[:-1])
    assert not buf.matches(reversed(list(model.parameters())))
    assert not buf.matches(_net(3, 4, 2).parameters())
    frozen = _net(3, 4, 2)
    buf2 = GradBuffer(frozen.parameters(), 2)
    frozen[1].bias.requires_grad_(False)
    assert not buf2.matches(frozen.parameters())
    model.double()
    assert not buf.matches(model.parameters())


def test_matches_refuses_parameters_moved_to_another_device():
    model = _net(3, 2)
    buf = GradBuffer(model.parameters(), 2)
    moved = nn.Parameter(torch.empty(2, device="meta"))
    torch.utils.swap_tensors(model[0].bias, moved)  # the same parameter, now on another device
    assert model[0].bias.device.type == "meta"
    assert buf.params[1] is model[0].bias
    assert not buf.matches(model.parameters())


def test_detach_grads_copies_row_zero_into_separate_tensors():
    model = _net(3, 4)
    buf = GradBuffer(model.parameters(), 3)
    for i in range(3):
        buf.J[i].fill_(float(i + 1))
    buf.detach_grads()
    for p in buf.params:
        assert bool((p.grad == 1).all()) and p.grad.shape == p.shape
    buf.J.zero_()
    assert all(bool((p.grad == 1).all()) for p in buf.params)


# -- batch helpers --------------------------------------------------------------------------------
def test_batch_size_is_the_leading_size_of_the_first_batch_tensor():
    assert batch_size(torch.zeros(5, 2)) == 5
    assert batch_size(torch.tensor(1.0)) is None
    b = {"s": torch.tensor(1.0), "a": 3, "x": torch.zeros(7), "y": torch.zeros(2)}
    assert batch_size(b) == 7
    assert batch_size([1, (None, torch.zeros(4, 1)), torch.zeros(9)]) == 4
    assert batch_size(("text", 3.0, [])) is None
    assert batch_size("abc") is None and batch_size(None) is None


Pair = namedtuple("Pair", "x y")


class Rows(list):
    pass


def test_map_batch_keeps_every_container_type_and_non_tensors():
    x, s = torch.arange(6.0), torch.tensor(2.0)
    out = map_batch({"a": [x, 1], "b": (x, s), "c": Pair(x, "k"), "d": Rows([x])}, lambda t: t[:2])
    assert type(out) is dict and list(out) == ["a", "b", "c", "d"]
    assert type(out["a"]) is list and out["a"][1] == 1 and torch.equal(out["a"][0], x[:2])
    assert type(out["b"]) is tuple and out["b"][1] is s
    assert type(out["c"]) is Pair and out["c"].y == "k" and torch.equal(out["c"].x, x[:2])
    assert type(out["d"]) is Rows and torch.equal(out["d"][0], x[:2])
    assert map_batch(3, lambda t: t[:1]) == 3


def test_check_batch_refuses_a_tensor_of_another_length_and_names_it():
    check_batch({"x": torch.zeros(6, 2), "y": [torch.zeros(6)], "s": torch.tensor(1.0)}, 6)
    with pytest.raises(ValueError, match=r"leading dimension B=6.*shape \[5, 2\]"):
        check_batch((torch.zeros(6), torch.zeros(5, 2)), 6)
    with pytest.raises(ValueError, match="leading dimension B=6"):
        check_batch(torch.zeros(7), 6)


@pytest.mark.parametrize("batch", [{"s": torch.tensor(1.0)}, [1, 2.0, None], ()])
def test_check_batch_refuses_a_batch_without_a_batch_tensor(batch):
    with pytest.raises(ValueError, match="holds no tensor with a batch dimension"):
        check_batch(batch, 3)


def test_check_batch_refuses_lists_of_per_sample_numbers_beyond_four():
    x = torch.zeros(5, 2)
    with pytest.raises(TypeError, match=r"batch\[1\] is a list of B=5 numbers"):
        check_batch((x, [0, 1, 2, 3, 4]), 5)
    with pytest.raises(TypeError, match=r"batch\['t'\] is a tuple of B=5"):
        check_batch({"x": x, "t": tuple(torch.tensor(float(i)) for i in range(5))}, 5)
    check_batch((x, [0, 1, 2, 3, 4]), 5, lists=False)  # a rank's slice
    check_batch((x, [0, 1, 2, 3]), 5)  # not B long
    check_batch((torch.zeros(4), [0.5, 0.5, 0.5, 0.5]), 4)  # settings may match a tiny B
    check_batch((x, [torch.zeros(5), 1, 2, 3, 4]), 5)  # not only numbers: its leaves are checked


def test_check_batch_refuses_strings_and_other_objects_by_their_path():
    x = torch.zeros(3)
    with pytest.raises(TypeError, match=r"batch\['cap'\]\[1\] is a str"):
        check_batch({"x": x, "cap": [x, "a photo"]}, 3)
    with pytest.raises(TypeError, match=r"batch\[0\] is a object"):
        check_batch([object(), x], 3)


def test_slice_and_take_cut_every_batch_tensor_alike():
    x = torch.arange(10.0).view(5, 2)
    y = torch.arange(5)
    b = {"x": x, "p": Pair(y, 7)}
    s = slice_batch(b, 1, 4)
    assert torch.equal(s["x"], x[1:4]) and torch.equal(s["p"].x, y[1:4]) and s["p"].y == 7
    idx = torch.tensor([4, 0, 2])
    g = take_batch(b, idx)
    assert torch.equal(g["x"], x[[4, 0, 2]]) and torch.equal(g["p"].x, torch.tensor([4, 0, 2]))


# -- Comm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["yes", None, "true"])
def test_comm_refuses_other_settings(bad):
    with pytest.raises(ValueError, match="distributed must be 'auto', True or False"):
        Comm(bad)


def test_comm_is_the_identity_without_a_process_group():
    for enabled in ("auto", False):
        c = Comm(enabled)
        assert not c.active and c.world == 1
        x = torch.arange(3.0)
        assert c.sum_(x) is x and torch.equal(x, torch.arange(3.0))
    with pytest.raises(ValueError, match="distributed=True but torch.distributed is not init"):
        Comm(True)


def test_comm_built_before_the_group_turns_on_unless_switched_off(tmp_path):
    import torch.distributed as dist

    early, off = Comm("auto"), Comm(False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        assert not early.active
        early.resolve()
        off.resolve()
        assert early.active and early.world == 1
        assert not off.active and off.world == 1
        on = Comm(True)
        assert on.active and on.world == 1 and on.group is None
        x = torch.arange(4.0)
        assert on.sum_(x) is x and torch.equal(x, torch.arange(4.0))  # one rank: the sum is x
        assert not Comm(False).active
    finally:
        dist.destroy_process_group()


def test_comm_stays_on_once_resolved(one_rank_group):
    c = Comm("auto")
    c.active, c.world = True, 3  # already decided: resolve leaves it
    c.resolve()
    assert c.world == 3


def test_comm_reads_the_world_size_of_its_group(monkeypatch):
    import antdiff.engine.distributed as d

    asked = []
    monkeypatch.setattr(d.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(d.dist, "get_world_size", lambda g=None: asked.append(g) or 3)
    group = object()
    c = Comm("auto", group)
    assert c.active and c.world == 3 and asked == [group]


@pytest.mark.parametrize("like", [0, 1, 0.0])
def test_comm_refuses_numbers_that_equal_a_bool(like, one_rank_group):
    """0 == False, but Comm(0) turned the reduction on under a process group (it is not
    ``False``), and Comm(1) without a group did not raise as True does: refused by name."""
    with pytest.raises(ValueError, match="distributed must be 'auto', True or False"):
        Comm(like)
