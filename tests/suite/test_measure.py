"""The memory gauge on allocations whose size is known: live tensor bytes per phase, the CPU analogue of
the CUDA allocator's peak, and which training steps it measures."""

import torch

from sparsegrad.suite.run import examples as examples_lib
from sparsegrad.suite.run import measure
from sparsegrad.suite.run.live_bytes import LiveTensorBytes, tensors_of

MB4 = 1_000_000  # float32 entries of 4,000,000 bytes


def test_a_phase_peak_holds_what_it_freed_exactly_and_the_next_phase_does_not():
    model = torch.nn.Linear(4, 4)  # 16 + 4 float32: 80 bytes, made before the meter
    meter = measure.MemoryMeter("cpu").watch(model)
    assert meter.current_bytes() == 80
    with meter.phase("basis"):
        scratch = torch.empty(MB4)
        del scratch
        kept = torch.ones(10)  # 40 bytes that outlive the phase
    assert meter.peak("basis") == 80 + 4 * MB4
    with meter.phase("train"):
        x = torch.zeros(1000)
        y = x.view(10, 100)  # a view: no new storage
        del x, y
    assert meter.peak("train") == 80 + 40 + 4000  # the basis phase's 4 MB are gone, its survivor counts
    assert kept.sum() == 10
    meter.stop()


def test_frees_of_watched_tensors_count_and_unmeasured_entries_are_not_gauged():
    model = torch.nn.Linear(100, 10, bias=False)  # 4,000 bytes
    meter = measure.MemoryMeter("cpu").watch(model)
    with meter.phase("train", measure=False):
        torch.empty(MB4)
    assert meter.peak("train") is None and meter.measured == {}
    model.weight.grad = torch.ones_like(model.weight)  # made outside any phase: adopted at the next entry
    with meter.phase("train"):
        model.weight.grad = None  # frees 4,000 bytes
        torch.empty(250)  # 1,000 bytes, freed at once
    assert meter.peak("train") == 8000  # weight + gradient at entry
    assert meter.current_bytes() == 4000
    assert meter.measured == {"train": 1}
    meter.stop()


def test_out_variants_that_resize_and_sparse_tensors_are_counted():
    gauge = LiveTensorBytes()
    with gauge:
        out = torch.empty(10)
        a = torch.zeros(100)
        torch.add(a, 1.0, out=out.resize_(0))  # the out tensor grows in place to 100 entries
        assert gauge.live == 400 + 400 and gauge.peak == 800
        sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (5,),
                                         check_invariants=True)
        assert gauge.live == 800 + 2 * 8 + 2 * 4  # int64 indices and float32 values
    del out, a, sparse
    assert gauge.live == 0


def test_tensors_of_a_model_and_its_optimizer():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    found = {t.data_ptr() for t in tensors_of(model, opt)}
    expected = {p.data_ptr() for p in model.parameters()} | {p.grad.data_ptr() for p in model.parameters()}
    expected |= {v.data_ptr() for s in opt.state.values() for v in s.values() if v.dim() > 0}
    assert expected <= found


def test_the_meter_measures_each_new_batch_shape_once():
    meter = measure.MemoryMeter("cpu")
    assert meter.wants("train", [(16, 20)])
    assert not meter.wants("train", [(16, 20)]) and not meter.wants("train", [(16, 12)])
    assert meter.wants("train", [(16, 25)])  # longer
    assert meter.wants("train", [(32, 10)])  # more rows, shorter
    assert not meter.wants("train", [(8, 24), (30, 9)])  # each covered by one measured before
    assert meter.intrusive and meter.gauge == measure.LIVE_GAUGE


def test_older_records_name_their_gauge():
    assert measure.record_gauge({"device_type": "cpu", "how": "peak process RSS"}) == measure.RSS_GAUGE
    assert measure.record_gauge({"device_type": "cuda", "how": "torch.cuda..."}) == measure.CUDA_GAUGE
    assert measure.record_gauge({"device_type": "cpu", "gauge": measure.LIVE_GAUGE}) == measure.LIVE_GAUGE


def test_per_example_entries_recompute_the_metric():
    entry = examples_lib.entry("classification", "test", "best", predictions=[1, 0, 1, 1], labels=[1, 1, 1, 0])
    assert entry["predictions"] == "1011" and entry["labels"] == "1110"
    data = examples_lib.arrays(entry)
    assert examples_lib.metric("classification", data, "accuracy") == 0.5
    assert examples_lib.metric("classification", data, "accuracy", index=[0, 0, 2]) == 1.0
    lm = examples_lib.arrays(examples_lib.entry("causal_lm", "v", "best", loss_sums=[6.0, 2.0], tokens=[3, 1]))
    assert examples_lib.metric("causal_lm", lm, "loss") == 2.0
