"""The bundled model is real: it loads offline and draws what single-object prompts ask for."""
from ernielab.image.pipeline import DEFAULT_MODEL, TextToImagePipeline
from ernielab.worlds.alignment import score
from ernielab.worlds.shapes import make_prompts


def test_bundled_model_is_small_and_loads():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size < 30 * 2**20
    pipe = TextToImagePipeline.from_pretrained()
    assert pipe.config.steps == 50 and pipe.config.guidance_scale == 4.0


def test_bundled_model_follows_single_object_prompts():
    pipe = TextToImagePipeline.from_pretrained()
    prompts = make_prompts("single", 18, seed=0)  # every colour x shape once
    images = pipe(prompts, num_inference_steps=20, seed=0, batch_size=18, output_type="np").images
    result = score(prompts, list(images))
    assert result["overall"]["color"] >= 0.9, result
    assert result["overall"]["all"] >= 0.6, result  # a random-weight model scores ~0 here
