"""data files -> batches: each format, with real values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data.distributed import DistributedSampler

from perdiag.data import Batch, Examples, iter_batches, load_examples, make_loader, random_examples


def test_pt_tensor(tmp_path):
    x = torch.randn(10, 3)
    torch.save(x, tmp_path / "x.pt")
    examples = load_examples(tmp_path / "x.pt")
    assert torch.equal(examples.args[0], x) and not examples.has_targets and examples.kwargs == {}
    assert examples.inputs_description() == "x: (10, 3) float32"


def test_pt_inputs_targets_tuple(tmp_path):
    x, y = torch.randn(10, 3), torch.arange(10)
    torch.save((x, y), tmp_path / "xy.pt")
    examples = load_examples(tmp_path / "xy.pt")
    assert torch.equal(examples.args[0], x) and torch.equal(examples.targets, y) and len(examples) == 10


def test_pt_list_of_batches(tmp_path):
    parts = [torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 3)]
    torch.save(parts, tmp_path / "batches.pt")
    assert torch.equal(load_examples(tmp_path / "batches.pt").args[0], torch.cat(parts))
    # two batches of one input (different lengths) are not mistaken for (inputs, targets)
    torch.save(parts[1:], tmp_path / "two.pt")
    assert len(load_examples(tmp_path / "two.pt")) == 6
    pairs = [(torch.randn(4, 3), torch.arange(4)), (torch.randn(3, 3), torch.arange(3))]
    torch.save(pairs, tmp_path / "pairs.pt")
    examples = load_examples(tmp_path / "pairs.pt")
    assert len(examples) == 7 and examples.targets.tolist() == [0, 1, 2, 3, 0, 1, 2]


def test_pt_dict_kwargs_with_attention_mask(tmp_path):
    ids = torch.randint(0, 100, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.bool)
    labels = torch.arange(6)
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": labels}, tmp_path / "tok.pt")
    examples = load_examples(tmp_path / "tok.pt")
    assert examples.args == ()
    assert set(examples.kwargs) == {"input_ids", "attention_mask"}
    assert examples.kwargs["input_ids"].dtype == torch.int64  # token ids stay integer
    assert examples.kwargs["attention_mask"].dtype == torch.bool
    assert torch.equal(examples.targets, labels)
    batch = next(iter(make_loader(examples, 4)))
    assert batch.kwargs["input_ids"].shape == (4, 5) and len(batch) == 4

    seen = {}

    def model(input_ids, attention_mask):
        seen.update(ids=input_ids, mask=attention_mask)
        return input_ids.float()

    batch.call(model)
    assert torch.equal(seen["ids"], ids[:4]) and seen["mask"].dtype == torch.bool


def test_pt_list_of_dicts(tmp_path):
    batches = [{"input_ids": torch.arange(6).reshape(2, 3)}, {"input_ids": torch.arange(3).reshape(1, 3)}]
    torch.save(batches, tmp_path / "dicts.pt")
    assert load_examples(tmp_path / "dicts.pt").kwargs["input_ids"].shape == (3, 3)


def test_float64_becomes_float32(tmp_path):
    torch.save(torch.randn(4, 2, dtype=torch.float64), tmp_path / "d.pt")
    examples = load_examples(tmp_path / "d.pt")
    assert examples.args[0].dtype == torch.float32
    assert any("float32" in note for note in examples.notes)


def test_npy_and_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 4))
    np.save(tmp_path / "x.npy", x)
    assert np.allclose(load_examples(tmp_path / "x.npy").args[0].numpy(), x)
    np.savez(tmp_path / "xy.npz", x=x, y=np.arange(8))
    examples = load_examples(tmp_path / "xy.npz")
    assert examples.args[0].shape == (8, 4) and examples.targets.tolist() == list(range(8))
    np.savez(tmp_path / "single.npz", x)
    assert load_examples(tmp_path / "single.npz").args[0].shape == (8, 4)
    np.savez(tmp_path / "kw.npz", input_ids=np.arange(16).reshape(8, 2), labels=np.zeros(8, dtype=np.int64))
    examples = load_examples(tmp_path / "kw.npz")
    assert set(examples.kwargs) == {"input_ids"} and examples.has_targets


def test_inputs_key_and_target_key(tmp_path):
    torch.save({"a": torch.randn(3, 2), "mask": torch.ones(3, 2), "cls": torch.arange(3)}, tmp_path / "d.pt")
    examples = load_examples(tmp_path / "d.pt", inputs_key="a", target_column="cls")
    assert examples.args[0].shape == (3, 2) and set(examples.kwargs) == {"mask"}
    assert examples.targets.tolist() == [0, 1, 2]


def test_csv_target_column(tmp_path):
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [4, 5, 6], "label": [0, 1, 0]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    examples = load_examples(tmp_path / "t.csv", target_column="label")
    assert examples.args[0].dtype == torch.float32
    assert examples.args[0].tolist() == [[1, 4], [2, 5], [3, 6]]
    assert examples.targets.dtype == torch.int64 and examples.targets.tolist() == [0, 1, 0]
    frame.assign(label=[0.5, 1.0, 2.0]).to_csv(tmp_path / "r.csv", index=False)
    assert load_examples(tmp_path / "r.csv", target_column="label").targets.dtype == torch.float32
    assert load_examples(tmp_path / "t.csv").args[0].shape == (3, 2)  # "label" is the targets by default


def test_iter_batches_and_max_batches():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    examples = Examples((x,), targets=y)
    batches = list(iter_batches(examples, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[1].args[0].data_ptr() == x[4:].data_ptr()  # slices, not copies
    assert len(list(iter_batches(examples, 4, max_batches=2))) == 2
    assert torch.equal(torch.cat([b.targets for b in batches]), y)


def test_make_loader_yields_batches_and_repeats_with_seed():
    examples = Examples((torch.arange(12.0).reshape(12, 1),), targets=torch.arange(12))
    batches = list(make_loader(examples, 5, shuffle=True, seed=3))
    assert all(isinstance(b, Batch) for b in batches) and [len(b) for b in batches] == [5, 5, 2]
    again = list(make_loader(examples, 5, shuffle=True, seed=3))
    assert all(torch.equal(a.targets, b.targets) for a, b in zip(batches, again))
    assert sorted(torch.cat([b.targets for b in batches]).tolist()) == list(range(12))
    assert [len(b) for b in make_loader(examples, 5, drop_last=True)] == [5, 5]


def test_make_loader_with_distributed_sampler():
    examples = Examples((torch.arange(10.0).reshape(10, 1),))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(examples, num_replicas=2, rank=rank, shuffle=False)
        for batch in make_loader(examples, 3, sampler=sampler):
            assert batch.targets is None
            seen += batch.args[0].flatten().tolist()
    assert sorted(seen) == list(map(float, range(10)))


def test_random_examples_and_batch_to():
    examples = random_examples(100, (3, 4), seed=5)
    assert examples.args[0].shape == (100, 3, 4) and examples.args[0].dtype == torch.float32
    assert torch.equal(examples.args[0], random_examples(100, (3, 4), seed=5).args[0])
    assert not examples.has_targets
    batch = next(iter_batches(examples, 10)).to("cpu", dtype=torch.float16)
    assert batch.args[0].dtype == torch.float16


def test_csv_without_a_header_keeps_its_first_row(tmp_path):
    values = np.arange(12, dtype=np.float64).reshape(4, 3) * 0.5 - 1.25
    np.savetxt(tmp_path / "plain.csv", values, delimiter=",")  # no header line
    examples = load_examples(tmp_path / "plain.csv")
    np.testing.assert_array_equal(examples.args[0].numpy(), values.astype(np.float32))
    assert any("no header row" in note for note in examples.notes)
    # Its columns are numbered, so a target column can still be named.
    labelled = load_examples(tmp_path / "plain.csv", target_column="2")
    assert labelled.args[0].shape == (4, 2) and labelled.targets.tolist() == values[:, 2].astype(np.float32).tolist()
    # Numbered columns 0..k-1 (pandas' to_csv of an array) are a header, not data.
    pd.DataFrame(values).to_csv(tmp_path / "numbered.csv", index=False)
    numbered = load_examples(tmp_path / "numbered.csv")
    assert numbered.args[0].shape == (4, 3) and not any("no header row" in note for note in numbered.notes)


def test_csv_label_column_is_the_targets_by_default(tmp_path):
    frame = pd.DataFrame({"a": [0.5, 1.5, 2.5], "b": [1.0, 2.0, 3.0], "label": [2, 0, 1]})
    frame.to_csv(tmp_path / "labelled.csv", index=False)
    examples = load_examples(tmp_path / "labelled.csv")
    assert examples.args[0].shape == (3, 2) and examples.targets.tolist() == [2, 0, 1]


def test_headerless_csv_with_repeated_values_keeps_its_first_row(tmp_path):
    # pandas renames a repeated name "0.5" to "0.5.1", which is no number: judge the raw first line.
    values = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.25, 0.5, 2.0], [0.0, 0.0, 0.0, 1.0]])
    np.savetxt(tmp_path / "repeats.csv", values, delimiter=",")
    examples = load_examples(tmp_path / "repeats.csv", target_column="3")
    assert examples.args[0].shape == (3, 3) and examples.targets.tolist() == [0, 2, 1]


def test_pandas_index_column_is_dropped_and_target_names_ignore_case(tmp_path):
    frame = pd.DataFrame({"a": [0.5, 1.5, 2.5], "b": [1.0, 2.0, 3.0], "LABEL": [2, 0, 1]})
    frame.to_csv(tmp_path / "indexed.csv")  # pandas' default: an unnamed 0..n-1 index column first
    examples = load_examples(tmp_path / "indexed.csv")
    assert examples.args[0].tolist() == [[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]] and examples.targets.tolist() == [2, 0, 1]
    assert any("pandas index" in note for note in examples.notes)
    assert "targets: (3,) int64" in examples.inputs_description()


def test_npz_of_two_unnamed_arrays_is_inputs_and_targets(tmp_path):
    np.savez(tmp_path / "pair.npz", np.zeros((5, 3), dtype=np.float32), np.arange(5))
    examples = load_examples(tmp_path / "pair.npz")
    assert examples.args[0].shape == (5, 3) and examples.targets.tolist() == [0, 1, 2, 3, 4]


def test_batch_call_names_inputs_forward_cannot_take_but_keeps_the_models_own_type_errors():
    import pytest

    from perdiag.errors import PerdiagError

    class Net(torch.nn.Module):
        def forward(self, x):
            return x + "text"  # a bug inside forward: TypeError, not a data problem

    with pytest.raises(PerdiagError, match="forward\\(x\\) cannot take.*keyword images"):
        Batch(args=(), kwargs={"images": torch.zeros(2)}).call(Net())
    with pytest.raises(TypeError):
        Batch(args=(torch.zeros(2),), kwargs={}).call(Net())
