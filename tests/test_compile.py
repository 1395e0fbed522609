"""torch.compile of the image encoder, checked on the CPU. The call --compile makes on CUDA
(models.speed_up_image_encoder, i.e. utils.speed) is made on a CPU module, and the compiled encoder
runs through the trainers' epoch (training.train_one_epoch: forward, backward, optimizer step) and
the evaluators' feature extraction (evaluation.extract_features, with a last batch smaller than the
others and the mirrored images). It gives the eager results and compiles one graph per pass kind.

The default run compiles with "aot_eager": dynamo's graph capture, guards and recompiles and AOT
autograd's forward/backward graphs, as inductor gets them, without inductor's C++ build (about a
minute per graph on 2 cores). `-m slow` runs the same tests with inductor itself."""
import copy

import pytest
import torch

import clip
import eval_query_gallery_clip_zeroshot
import eval_query_gallery_finetune
import losses
import models
import train_clipreid
import train_finetune
import train_handid
import train_promptsg
from utils import evaluation, speed, training

pytestmark = pytest.mark.usefixtures("single_torch_thread")

BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
NUM_CLASSES, SIZE, LR = 6, (64, 64), 1e-4
# aot_eager runs the same ATen kernels, but on channels_last ResNets other convolution kernels; inductor
# fuses kernels; both move fp32 sums in the last bits (a wrong graph moves results by 1e-2 and more)
TOLERANCE = {"aot_eager": dict(rtol=1e-4, atol=1e-5), "inductor": dict(rtol=1e-4, atol=1e-5)}


class Graphs(list):
    tolerance = None  # assert_close arguments for results of this backend against eager ones


@pytest.fixture
def graphs(request, monkeypatch):
    """speed.COMPILE_BACKEND replaced by one that records every graph it compiles (then compiles it
    with the test's backend); dynamo's caches emptied before and after."""
    torch._dynamo.reset()
    backend = torch._dynamo.lookup_backend(request.param)
    compiled = Graphs()
    compiled.tolerance = TOLERANCE[request.param]

    def counting(graph_module, example_inputs):
        compiled.append(graph_module)
        return backend(graph_module, example_inputs)

    monkeypatch.setattr(speed, "COMPILE_BACKEND", counting)
    yield compiled
    torch._dynamo.reset()


def batches(count, batch_size, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, *SIZE, generator=generator),
             torch.arange(batch_size) % NUM_CLASSES) for _ in range(count)]


def finetune_objective(checkpoint):
    """The model and objective of train_finetune.py on a tiny ResNet."""
    torch.manual_seed(0)
    model = models.HandReIDModel(models.load_backbone(models.backbone_spec(checkpoint, SIZE)), NUM_CLASSES)
    return losses.FinetuneLoss(model, ls=0.1, triplet_weight=1.0)


def clipreid_objective(checkpoint):
    """Stage 2 of train_clipreid.py with the side-information embedding, whose hook on ln_pre runs
    inside the compiled forward_features, on a tiny ViT."""
    torch.manual_seed(0)
    visual = models.load_backbone(models.backbone_spec(checkpoint, SIZE))
    model = models.ClipReIDModel(visual, NUM_CLASSES, sie_aspects=["dorsal right", "palmar right"],
                                 class_aspect=[i % 2 for i in range(NUM_CLASSES)])
    return losses.ClipReIDLoss(model, torch.randn(NUM_CLASSES, visual.feature_dims["proj"]))


def trainer(objective):
    """One-batch epochs of train_one_epoch, as a trainer runs them (Adam, lr LR); returns each loss."""
    optimizer = training.make_optimizer("adam", training.param_groups(objective.model, LR, 5e-4), LR, 5e-4)
    scaler = training.make_grad_scaler("none", "cpu")
    return lambda batch, epoch: training.train_one_epoch(objective, [batch], training.module_loss, [optimizer], scaler,
                                                         "none", "cpu", epoch, progress=False).losses["loss"]


def flat(tensors):
    return torch.cat([t.detach().double().flatten() for t in tensors])


def assert_same_training(eager, fast, tolerance):
    """The first step's loss and gradients (from the same weights), then two more steps' losses and
    where the three steps took the weights."""
    before = flat(eager.parameters())
    steps = batches(3, 8, seed=1)
    train_eager, train_fast = trainer(eager), trainer(fast)
    assert train_fast(steps[0], 1) == pytest.approx(train_eager(steps[0], 1), rel=tolerance["rtol"])
    fast_params = dict(fast.named_parameters())
    for name, param in eager.named_parameters():
        if param.grad is None:
            continue
        got, expected = fast_params[name].grad.double(), param.grad.double()
        if expected.abs().max() < 1e-6:  # some exact gradients are 0 (the attention keys' bias; a bias before
            # BNNeck's batch statistics), seen as rounding noise of ~1e-8
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            continue
        # direction and size, not element by element: a gradient through batch norm sums large terms that
        # cancel; with ATEN_CPU_CAPABILITY=default the eager fp32 kernels' result is 0.2 % off in size from
        # fp64 (1 - cosine 1e-5), the compiled one's is closer; a wrong gradient is off by far more
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9999, name
        assert got.norm() == pytest.approx(expected.norm(), rel=1e-2), name
    for epoch, batch in enumerate(steps[1:], 2):
        assert train_fast(batch, epoch) == pytest.approx(train_eager(batch, epoch), rel=tolerance["rtol"])
    # Adam moves each weight by about +-lr a step, whatever the gradient's size, so gradients within rounding
    # of 0 move some weights either way: the updates are compared as a whole
    moved_eager, moved_fast = flat(eager.parameters()) - before, flat(fast.parameters()) - before
    assert moved_eager.abs().max() > LR
    assert torch.nn.functional.cosine_similarity(moved_fast, moved_eager, dim=0) > 0.999


def eval_features(forward_fn):
    """The evaluators' extraction: 10 images in batches of 4 (the last one of 2), with the mirror."""
    images = torch.randn(10, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(10)), batch_size=4)
    return evaluation.extract_features(forward_fn, loader, "cpu", flip=True)[0]


@pytest.mark.parametrize("graphs", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["rn", "vit"])
def test_compiled_training_and_evaluation_give_the_eager_results(graphs, kind, tiny_rn_checkpoint, tiny_vit_checkpoint):
    build = finetune_objective if kind == "rn" else clipreid_objective
    checkpoint = tiny_rn_checkpoint if kind == "rn" else tiny_vit_checkpoint
    eager = build(checkpoint)
    fast = copy.deepcopy(eager)
    note = models.speed_up_image_encoder(fast.model.visual, "cuda", compile=True, for_training=True)  # a trainer's
    assert note.endswith("torch.compile of the image encoder (training passes)")
    assert_same_training(eager, fast, graphs.tolerance)
    assert len(graphs) == 1  # one graph for every training batch: no graph break, no recompile
    # a trainer validates eagerly (eval mode): nothing more is compiled
    fast.model.load_state_dict(eager.model.state_dict())
    for objective in (eager, fast):
        objective.model.eval()
        if kind == "vit":
            objective.model.set_test_aspect("palmar right")
    expected = eval_features(eager.model)
    torch.testing.assert_close(eval_features(fast.model), expected, rtol=1e-5, atol=1e-5)  # RN: channels_last
    assert len(graphs) == 1

    # an evaluator: the trained weights rebuilt and compiled for evaluation passes
    evaluated = copy.deepcopy(eager.model)
    note = models.speed_up_image_encoder(evaluated.visual, "cuda", compile=True, for_training=False)
    assert note.endswith("torch.compile of the image encoder (evaluation passes)")
    torch.testing.assert_close(eval_features(evaluated), expected, **graphs.tolerance)
    assert len(graphs) == 2  # batches of 4, 4 and 2 (padded to 4), each mirrored: one more graph in all
    assert evaluated.visual.forward_features.largest_batch == 4


@pytest.mark.parametrize("graphs", BACKENDS, indirect=True)
def test_compiled_zero_shot_encoder_gives_the_eager_features(graphs, tiny_vit_checkpoint):
    """The zero-shot evaluator encodes with CLIP's encode_image, i.e. the encoder's forward."""
    model, _ = clip.load(tiny_vit_checkpoint, device="cpu", input_size=SIZE)
    expected = eval_features(model.encode_image)
    models.speed_up_image_encoder(model.visual, "cuda", compile=True, for_training=False)
    torch.testing.assert_close(eval_features(model.encode_image), expected, **graphs.tolerance)
    assert len(graphs) == 1


@pytest.mark.parametrize("graphs", ["aot_eager"], indirect=True)
def test_a_larger_evaluation_batch_compiles_once_more_and_pads_to_it(graphs, tiny_vit_checkpoint):
    visual = models.load_backbone(models.backbone_spec(tiny_vit_checkpoint, SIZE)).eval()
    models.speed_up_image_encoder(visual, "cuda", compile=True, for_training=False)
    images = torch.randn(7, 3, *SIZE)
    with torch.no_grad():
        expected = visual.forward_features.eager(images)["proj"]
        for count in (3, 2, 7, 5, 1):  # a set smaller than one batch first, then a full batch
            got = visual.forward_features(images[:count])
            assert set(got) == {"penultimate", "pre_proj", "proj", "tokens"}
            assert got["proj"].shape[0] == count
            torch.testing.assert_close(got["proj"], expected[:count], rtol=1e-5, atol=1e-6)
    assert len(graphs) == 2 and visual.forward_features.largest_batch == 7


def test_compile_is_off_by_default_and_needs_cuda(tiny_vit_checkpoint, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(options) or fn)
    visual = models.load_backbone(models.backbone_spec(tiny_vit_checkpoint, SIZE))
    assert models.speed_up_image_encoder(visual, "cuda", for_training=True) == "" and not compiled  # the default
    assert models.speed_up_image_encoder(visual, "cpu", compile=True, for_training=False) == \
        "--compile ignored: it needs CUDA"
    assert not compiled and not isinstance(visual.forward_features, speed.CompiledEncoderCall)
    models.speed_up_image_encoder(visual, "cuda:0", compile=True, for_training=True)
    assert compiled == [{"backend": speed.COMPILE_BACKEND, "dynamic": False}] * 2  # forward_features and forward
    assert isinstance(visual.forward, speed.CompiledEncoderCall)
    assert [models.use_compile(flag, device) for flag, device in
            [(None, "cuda"), (False, "cuda"), (True, "cuda:1"), (True, "cpu")]] == [False, False, True, False]
    for script in (train_finetune, train_clipreid, train_promptsg, train_handid, eval_query_gallery_finetune,
                   eval_query_gallery_clip_zeroshot):
        assert script.parse_args([]).compile is None and script.parse_args(["--compile"]).compile is True


def test_cudnn_autotuning_only_for_cuda_training_runs(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    speed.autotune_convolutions("cpu", deterministic=False)
    speed.autotune_convolutions("cuda", deterministic=True)
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(speed, "CUDNN_BENCHMARK", False)  # benchmark.py --fast_paths switches it off
    speed.autotune_convolutions("cuda", deterministic=False)
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(speed, "CUDNN_BENCHMARK", True)
    speed.autotune_convolutions("cuda:0", deterministic=False)
    assert torch.backends.cudnn.benchmark is True

