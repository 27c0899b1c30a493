"""Recipe schema, presets, layering and --set overrides."""

import pytest

from character_baker.core.config import Recipe
from character_baker.core.errors import UserError
from character_baker.core.recipes import PRESETS, Layer, load_recipe_file, parse_set_overrides, resolve_recipe


def test_defaults_are_the_published_ones():
    recipe = Recipe()
    assert (recipe.distill.lora.r, recipe.distill.lora.alpha) == (64, 128)
    assert recipe.distill.learning_rate == 5e-5 and recipe.distill.warmup_ratio == 0.1
    assert (recipe.distill.beta, recipe.distill.nll_coef, recipe.distill.kl_coef) == (0.1, 0.1, 0.001)
    assert (recipe.distill.batch_size, recipe.distill.max_length, recipe.distill.epochs) == (32, 1024, 1)
    assert recipe.distill.best_of == 5  # K = 5 teacher samples per prompt (the best one becomes chosen)
    assert (recipe.generation.teacher.sampling.temperature, recipe.generation.teacher.sampling.top_p) == (0.7, 0.95)
    assert recipe.introspect.max_length == 3072 and recipe.introspect.turns == 10
    assert recipe.merge.weights == {"distill": 1.0, "introspect": 0.25}
    assert (recipe.sdft.ce_coef, recipe.sdft.kl_coef, recipe.sdft.temperature) == (1.0, 0.3, 2.0)
    assert recipe.profile.z_threshold == 2.0 and recipe.profile.top_n_fallback == 50
    assert recipe.prompts.persona_hint_fraction == 0.2


def test_every_field_is_documented():
    from pydantic import BaseModel

    def walk(model):
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from walk(annotation)
            else:
                yield f"{model.__name__}.{name}", info.description

    undocumented = [name for name, doc in walk(Recipe) if not doc and not name.startswith(("UserDataset", "DistillConfig.assistant"))]
    # Leaf fields without help text would leave the schema (our reference docs) incomplete.
    assert len(undocumented) <= 12, undocumented


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    resolved = resolve_recipe([], preset)
    assert resolved.recipe.preset == preset


def test_layers_apply_in_order_and_record_sources(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("distill:\n  lora:\n    r: 16\n  beta: 0.2\n")
    constitution_layer = Layer(name="constitution c.yaml", values={"distill": {"lora": {"r": 8}, "nll_coef": 0.5}})
    resolved = resolve_recipe([constitution_layer, load_recipe_file(recipe_file),
                               parse_set_overrides(["distill.beta=0.3"])], "smoke")
    distill = resolved.recipe.distill
    assert distill.lora.r == 16  # recipe file beats constitution
    assert distill.nll_coef == 0.5  # constitution beats preset/defaults
    assert distill.beta == 0.3  # --set beats everything
    assert distill.batch_size == PRESETS["smoke"]["distill"]["batch_size"]
    assert resolved.source_of("distill.lora.r") == f"--recipe {recipe_file}"
    assert resolved.source_of("distill.beta") == "--set"
    assert resolved.source_of("distill.nll_coef") == "constitution c.yaml"
    assert resolved.source_of("distill.batch_size") == "preset smoke"
    assert resolved.source_of("distill.kl_coef") == "default"


def test_set_values_are_typed():
    resolved = resolve_recipe([parse_set_overrides(["distill.lora.target_modules=[q_proj, v_proj]",
                                                    "models.trust_remote_code=true", "merge.weights.distill=0.5"])])
    assert resolved.recipe.distill.lora.target_modules == ["q_proj", "v_proj"]
    assert resolved.recipe.models.trust_remote_code is True
    assert resolved.recipe.merge.weights["distill"] == 0.5


def test_unknown_set_key_has_a_hint():
    with pytest.raises(UserError) as info:
        parse_set_overrides(["distill.lora.rank=3"])
    assert "did you mean 'distill.lora.r'" in str(info.value)


def test_unknown_key_in_file_names_file_line_and_hint(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("distill:\n  betta: 0.2\n  lora:\n    r: -1\n")
    with pytest.raises(UserError) as info:
        resolve_recipe([load_recipe_file(recipe_file)])
    problems = info.value.problems
    assert len(problems) == 2  # every problem at once
    by_field = {p.field: p for p in problems}
    assert by_field["distill.betta"].line == 2 and "did you mean 'beta'" in by_field["distill.betta"].fix
    assert by_field["distill.lora.r"].line == 4 and by_field["distill.lora.r"].file == str(recipe_file)


def test_bad_combination_rejected_up_front():
    with pytest.raises(UserError) as info:
        resolve_recipe([parse_set_overrides(["distill.batch_size=5", "distill.micro_batch_size=2"])])
    assert "multiple of distill.micro_batch_size" in str(info.value)


def test_unknown_preset():
    with pytest.raises(UserError) as info:
        resolve_recipe([], "smok")
    assert "did you mean 'smoke'" in str(info.value)


def test_preset_named_inside_a_layer():
    resolved = resolve_recipe([Layer(name="file", values={"preset": "small"})])
    assert resolved.recipe.preset == "small"
    assert resolved.recipe.prompts.questions_per_trait == PRESETS["small"]["prompts"]["questions_per_trait"]


def test_set_reaches_inside_optional_sections():
    resolved = resolve_recipe([parse_set_overrides(["generation.introspector.backend=openai",
                                                    "generation.introspector.model=served-persona"])])
    assert resolved.recipe.generation.introspector.model == "served-persona"
    with pytest.raises(UserError):
        parse_set_overrides(["generation.introspector.modell=x"])


def test_shipped_example_recipes_validate(cli):
    from pathlib import Path

    examples = sorted(Path("examples").glob("*.yaml"))
    assert examples
    for example in examples:
        code, _, err = cli("recipe", "validate", str(example), "--constitution", "constitutions/pirate.yaml")
        assert code == 0, err


def test_a_partial_override_keeps_the_rest_of_a_factory_built_section():
    # The judge's defaults (greedy, 16 tokens) come from a factory, not from SamplingConfig:
    # setting only its batch size, in a preset or with --set, must keep them.
    for preset in ("smoke", "small"):
        judge = resolve_recipe([], preset=preset).recipe.generation.judge
        assert (judge.sampling.temperature, judge.sampling.max_new_tokens) == (0.0, 16)
    layer = parse_set_overrides(["generation.judge.batch_size=7", "generation.prompt_writer.sampling.seed=3"])
    generation = resolve_recipe([layer]).recipe.generation
    assert generation.judge.batch_size == 7 and generation.judge.sampling.max_new_tokens == 16
    assert (generation.prompt_writer.sampling.temperature, generation.prompt_writer.sampling.seed) == (1.0, 3)
    # A plain mapping is replaced whole, not merged.
    weights = resolve_recipe([parse_set_overrides(["merge.weights={distill: 0.5}"])]).recipe.merge.weights
    assert weights == {"distill": 0.5}
