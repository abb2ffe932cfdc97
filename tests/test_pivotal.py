"""Pivotal tuning (train.new_tokens): new words trained beside the LoRA, bundled in the LoRA file as A1111 reads
them and written standalone as kohya does; sdlora and diffusers' load_textual_inversion read back what training
used; resume is exact."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train import assert_same, make_cfg

from sdlora.adapters.embeddings import read_embedding_file, split_bundle
from sdlora.errors import ConfigError, LoraFileError
from sdlora.generate.pipeline import LoraCache, LoraSpec, list_lora_files, load_pipeline
from sdlora.generate.prompt import encode_prompt_embeds
from sdlora.models.loading import expand_vectors, load_base_model
from sdlora.models.tiny import tiny_model_path
from sdlora.train.recipe import train

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")

PIVOTAL = ['train.new_tokens=["zkw"]', "train.new_token_vectors=2", 'data.caption_prefix="zkw, "',
           "train.embedding_lr=0.05", "train.report=false", "train.save_last_k=0"]
PROMPT = "zkw, a boat on the sea"


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def trained(request, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, train(make_cfg(dataset, out, f'model.base_model="{request.param}"', *PIVOTAL))


def test_the_words_train_and_both_files_hold_them(trained):
    model, out, lora = trained
    bundle, _ = split_bundle(load_file(str(lora)), lora)
    standalone = read_embedding_file(load_file(str(out / "embeddings" / "lora" / "zkw.safetensors")), "zkw")
    assert list(bundle) == ["zkw"]
    base = load_base_model(model)
    components = ["text_encoder", "text_encoder_2"][:len(base.text_encoders)]
    assert set(bundle["zkw"]) == set(standalone) == set(components)
    for component, encoder in zip(components, base.text_encoders):
        vectors = standalone[component]
        assert vectors.shape == (2, encoder.get_input_embeddings().weight.shape[1])
        assert torch.equal(bundle["zkw"][component], vectors)  # export.dtype fp32
        start = encoder.get_input_embeddings().weight.mean(0)  # new_token_init "" = the vocabulary's mean
        assert (vectors - start).abs().max() > 1e-3, f"{component}: the new word did not train"


def test_diffusers_reads_what_sdlora_generates_with(trained):
    """diffusers' own loaders (load_lora_weights without the bundle, load_textual_inversion of the standalone file,
    as its docs show for SDXL) give the prompt embedding sdlora's LoraCache gives with the bundled file."""
    model, out, lora = trained
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    ours = load_pipeline(model)
    LoraCache(ours).activate([LoraSpec(lora)])
    expected = encode_prompt_embeds(ours, PROMPT)

    sdxl = model == "tiny-sdxl"
    theirs = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(tiny_model_path(model))
    theirs.load_lora_weights({k: v for k, v in load_file(str(lora)).items() if not k.startswith("bundle_emb.")})
    file = load_file(str(out / "embeddings" / "lora" / "zkw.safetensors"))
    if sdxl:
        theirs.load_textual_inversion(file["clip_l"], token="zkw", text_encoder=theirs.text_encoder,
                                      tokenizer=theirs.tokenizer)
        theirs.load_textual_inversion(file["clip_g"], token="zkw", text_encoder=theirs.text_encoder_2,
                                      tokenizer=theirs.tokenizer_2)
        embeds, _, pooled, _ = theirs.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        torch.testing.assert_close(pooled, expected["pooled_prompt_embeds"])
    else:
        theirs.load_textual_inversion(str(out / "embeddings" / "lora" / "zkw.safetensors"), token="zkw")
        embeds, _ = theirs.encode_prompt(PROMPT, "cpu", 1, False)
    torch.testing.assert_close(embeds, expected["prompt_embeds"])
    assert expand_vectors(PROMPT, theirs.tokenizer) == "zkw zkw_1, a boat on the sea"


def test_each_file_brings_its_own_vectors_of_a_shared_word(trained, tmp_path):
    """The epochs of one run bundle the same word: a grid switches between them, so activating a file loads its
    vectors; a changed file is read again; a standalone file of the word takes its place."""
    from safetensors.torch import save_file

    model, out, lora = trained
    other = tmp_path / "other.safetensors"
    save_file({k: v * 2 if k.startswith("bundle_emb.") else v for k, v in load_file(str(lora)).items()}, str(other))
    pipe = load_pipeline(model)
    cache = LoraCache(pipe)

    def embeds(*files):
        cache.activate([LoraSpec(f) for f in files])
        return encode_prompt_embeds(pipe, PROMPT)["prompt_embeds"]

    first = embeds(lora)
    assert not torch.equal(embeds(other), first)
    torch.testing.assert_close(embeds(lora), first)
    lora.touch()  # a retrained file: its words are unloaded and loaded again
    torch.testing.assert_close(embeds(lora), first)
    assert cache.embed(out / "embeddings" / "lora" / "zkw.safetensors") == ["zkw"]
    torch.testing.assert_close(encode_prompt_embeds(pipe, PROMPT)["prompt_embeds"], first)
    assert lora in list_lora_files(out) and not any("embeddings" in p.parts for p in list_lora_files(out))


def test_resume_is_exact_with_new_words(dataset, tmp_path):
    straight = train(make_cfg(dataset, tmp_path / "a", *PIVOTAL, "train.checkpoint_every_n_steps=3"))
    resumed = train(make_cfg(dataset, tmp_path / "b", *PIVOTAL), resume=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(load_file(str(straight)), load_file(str(resumed)))


def test_words_alone_leave_the_text_encoders_without_lora(dataset, tmp_path):
    lora = train(make_cfg(dataset, tmp_path, *PIVOTAL, "lora.train_text_encoder=false"))
    keys = load_file(str(lora))
    assert not any(k.startswith("lora_te") for k in keys) and "bundle_emb.zkw.string_to_param.*" in keys


@pytest.mark.parametrize("word, message", [("boat", "already a token"), ("ZKW", "lower-case"),
                                           ("two words", "lower-case")])
def test_bad_words_are_refused_in_one_line(dataset, tmp_path, word, message):
    with pytest.raises(ConfigError, match=message) as error:
        train(make_cfg(dataset, tmp_path, f'train.new_tokens=["{word}"]'))
    assert "\n" not in str(error.value)


def test_new_words_cannot_use_cached_text_outputs(dataset, tmp_path):
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs"):
        make_cfg(dataset, tmp_path, *PIVOTAL, "lora.train_text_encoder=false", "data.cache_text_encoder_outputs=true")


def test_merge_into_base_leaves_bundled_words_out_with_a_note(trained):
    """A merged checkpoint keeps the base model's vocabulary (A1111 and ComfyUI load no other), so merge-into-base
    loads the file without its words and says where they are."""
    model, _, lora = trained
    pipe = load_pipeline(model)
    cache = LoraCache(pipe, embeddings=False)
    cache.load(lora)
    assert "bundled embeddings (zkw) are left out" in cache.notes[lora.resolve()]
    assert "zkw" not in pipe.tokenizer.get_vocab()


def test_lora_tools_carry_the_bundle_and_inspect_lists_it(trained, tmp_path):
    from sdlora.adapters.files import inspect_lora
    from sdlora.adapters.tools import merge_lora_files, resize_lora_file

    _, _, lora = trained
    bundled = {k: v for k, v in load_file(str(lora)).items() if k.startswith("bundle_emb.")}
    resize_lora_file(lora, tmp_path / "resized.safetensors", rank=2, dtype=torch.float32)
    merge_lora_files([(lora, 0.5), (tmp_path / "resized.safetensors", 0.5)], tmp_path / "merged.safetensors")
    for name in ("resized", "merged"):
        out = load_file(str(tmp_path / f"{name}.safetensors"))
        assert_same({k: v for k, v in out.items() if k.startswith("bundle_emb.")}, bundled)
    report = inspect_lora(lora)
    assert "Bundled embedding: zkw (2 vectors" in report and "not LoRA weights" not in report


def test_an_embedding_named_as_a_model_token_is_refused(trained, tmp_path):
    model, out, _ = trained
    clash = tmp_path / "boat.safetensors"
    clash.write_bytes((out / "embeddings" / "lora" / "zkw.safetensors").read_bytes())
    with pytest.raises(LoraFileError, match="'boat' is a token of this model"):
        LoraCache(load_pipeline(model)).embed(clash)


def test_generate_loads_the_embeddings_a_prompt_names(trained, tmp_path):
    """`sdlora generate --embedding-dir` (and the app's embeddings folder) loads what the prompt names, as A1111;
    `--embedding FILE` loads a file whatever the prompt says."""
    from sdlora.cli import main
    from sdlora.generate.pipeline import embeddings_named

    model, out, _ = trained
    folder = tmp_path / "embeddings" / "styles"
    folder.mkdir(parents=True)
    (folder / "zkw.safetensors").write_bytes((out / "embeddings" / "lora" / "zkw.safetensors").read_bytes())
    assert embeddings_named(tmp_path, "a (zkw:1.2) boat") == [folder / "zkw.safetensors"]
    assert embeddings_named(tmp_path, "a zkwx boat", "zk") == []
    common = ["generate", "--model", model, "--steps", "1", "--width", "64", "--height", "64", "--out"]
    assert main([*common, str(tmp_path / "a"), "--prompt", PROMPT, "--embedding-dir", str(tmp_path)]) == 0
    assert main([*common, str(tmp_path / "b"), "--prompt", PROMPT, "--embedding", str(folder / "zkw.safetensors")]) == 0
    assert main([*common, str(tmp_path / "c"), "--prompt", PROMPT]) == 0
    images = [(tmp_path / run / "00001-1.png").read_bytes() for run in "abc"]
    assert images[0] == images[1] != images[2]


def test_the_apps_generate_and_grid_load_the_embeddings_a_prompt_names(trained, tmp_path):
    """The app's embeddings folder serves the Generate tab and every cell of the X/Y grid; the grid's LoRA here bundles
    no words, so only the folder can bring the word in."""
    from sdlora.ui.app.engine import Engine
    from sdlora.ui.app.generate import SLOTS, run_generate, run_grid
    from sdlora.ui.app.settings import AppSettings

    model, out, lora = trained
    (tmp_path / "loras").mkdir()
    tensors = load_file(str(lora))
    save_file(split_bundle(tensors, lora)[1], str(tmp_path / "loras" / "plain.safetensors"))
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "zkw.safetensors").write_bytes((out / "embeddings" / "lora" / "zkw.safetensors").read_bytes())
    fields = (model, PROMPT, "", "euler", 1, 7.0, 64, 64, 3)
    off = [False, None, 1.0] * SLOTS

    def images(embedding_dir):
        engine = Engine(AppSettings(models_dir=tmp_path / "models", lora_dir=tmp_path / "loras",
                                    out_dir=tmp_path / "out", embedding_dir=embedding_dir))
        grid, _ = run_grid(engine, *fields, "plain.safetensors", "0", "seed", "3", *off)  # first: a word loaded
        generated, _, _ = run_generate(engine, *fields, 1, *off)  # stays loaded
        with Image.open(generated[0][0]) as image, Image.open(grid) as cells:
            cell = cells.crop((cells.width - 64, cells.height - 64, cells.width, cells.height))
            return np.asarray(image.convert("RGB"), float), np.asarray(cell.convert("RGB"), float)

    def differ(a, b):
        return np.abs(a - b).mean()

    with_word, without = images(tmp_path / "emb"), images(tmp_path / "nothing")
    # The cell equals the Generate tab's image up to a few rounded pixels (0.0001 here): loading a LoRA moves the
    # buffers, and a CPU matmul's last bit depends on their alignment. The word moves the image 0.7-1.1 levels.
    assert differ(*with_word) < 0.01 and differ(*without) < 0.01
    assert differ(with_word[0], without[0]) > 0.1 and differ(with_word[1], without[1]) > 0.1
