"""The web UI through its HTTP API (gradio_client): a real server on a free localhost port, a real
`dreamtune train` process on the shipped shapes-world model, sampling, the run list, bad input.
And, opt-in (`-m browser`), the same journey in headless chromium driven by selenium."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from dreamtune.ui import runs as R
from dreamtune.ui import schema

# Bounded waits: a run that does not finish in time fails with its log, it never hangs the suite.
RUN_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_jobs(root: Path) -> None:
    """End the training processes this test started (by their recorded process ids)."""
    for record in R.jobs_dir(root).glob("*.json"):
        pid = json.loads(record.read_text()).get("pid")
        if R._alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gradio_client import Client

    from dreamtune.ui.app import launch

    root = tmp_path_factory.mktemp("ui") / "runs"
    port = free_port()
    app = launch(root, port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False,
                    download_files=str(tmp_path_factory.mktemp("downloads")))
    yield client, root
    kill_jobs(root)
    app.close()


@pytest.fixture(scope="module")
def subject_files(tmp_path_factory):
    from dreamtune.world import write_subject_images

    folder = tmp_path_factory.mktemp("star")
    write_subject_images("striped_star", folder)
    return sorted(str(p) for p in folder.glob("*.png"))


def wait_until_done(client, name: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        status = client.predict(name, api_name="/poll")[3]
        if "finished" in status or "failed" in status or "stopped" in status:
            return status
        time.sleep(1)
    raise AssertionError(f"run {name} did not end within {RUN_TIMEOUT} s; output:\n"
                         + client.predict(name, api_name="/poll")[4])


def test_advanced_panel_has_every_option_of_the_schema(server):
    from dreamtune.config import options_help

    client, _ = server
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/start"]
    params = {p["parameter_name"]: p for p in api["parameters"]}
    names = [f"{s[1:-1]}_{name}" if s.startswith("[") else name for s, name, _, _ in options_help()]
    assert set(names) <= set(params) | set(schema.MAIN_OPTIONS)
    for o in schema.advanced_options():
        assert params[o.param]["parameter_has_default"], o.param
    assert {o.name for o in schema.advanced_options()}.isdisjoint(schema.MAIN_OPTIONS)


def test_train_five_steps_sample_and_list(server, subject_files, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    from dreamtune import load_config, load_pipeline, sample
    from dreamtune.cli import build_config, build_parser
    from dreamtune.config import config_to_toml

    client, root = server
    message, command, current = client.predict(
        name="star-lora", files=[handle_file(f) for f in subject_files], method="lora", class_noun="star",
        steps=5, learning_rate=1e-3, validation_steps=5, num_validation_images=1, validation_inference_steps=2,
        api_name="/start")
    assert current == "star-lora", message
    # While it runs, a second job is refused, and the message says it was not queued.
    refused = client.predict(name="second", files=[handle_file(f) for f in subject_files], class_noun="star",
                             api_name="/start")[0]
    assert "one job at a time" in refused and "not queued" in refused
    assert not (root / "second").exists()

    status = wait_until_done(client, "star-lora")
    assert "finished" in status, client.predict("star-lora", api_name="/poll")[4]
    run = root / "star-lora"
    assert len(R.read_metrics(run)) == 5
    assert (run / "artifact" / "pytorch_lora_weights.safetensors").is_file()
    grids = client.predict("star-lora", api_name="/poll")[2]
    assert [Path(g["image"]).name for g in grids] == ["step-000005.png"]

    # The command shown is the run: parsed by the CLI it resolves to the config the run wrote.
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert config_to_toml(build_config(args)) == (run / "config.toml").read_text()
    assert load_config(run / "config.toml").method == "lora"

    # Sample tab: the images are those of `dreamtune.sample` with the same settings, each PNG carrying them.
    markdown, gallery, files = client.predict(run="star-lora", prompt="a photo of a sks star", count=2, seed=3,
                                              steps=4, guidance=3.0, api_name="/sample")
    assert "dreamtune sample --weights" in markdown
    expected = sample(load_pipeline(None, run), "a photo of a sks star", num_images=2, seed=3, steps=4, guidance=3.0)
    for i, item in enumerate(gallery):
        with Image.open(item["image"]) as image:
            settings = json.loads(image.info["parameters"])
            assert settings["seed"] == 3 + i and settings["steps"] == 4
            assert list(image.convert("RGB").getdata()) == list(expected[i].getdata())
    assert len(files) == 2

    table = client.predict(api_name="/runs")[0]["data"]
    assert ["star-lora", "finished", "lora", "5/5", ""] in table


@pytest.mark.slow
def test_compare_scores_world_runs_with_the_demo_oracle(tmp_path):
    from dreamtune import load_pipeline
    from dreamtune.training import train
    from dreamtune.ui.app import Face
    from dreamtune.world import MODEL_DIR, write_subject_images
    from dreamtune.world.demo import score_model, train_config
    from dreamtune.world.subjects import get_subject

    subject = get_subject("striped_star")
    write_subject_images(subject, tmp_path / "star")
    config = train_config(subject, "dreambooth", tmp_path / "star", tmp_path / "class", tmp_path / "runs" / "star",
                          steps=3, seed=0, with_prior_preservation=False)
    train(config, progress=False)
    message, rows, text = Face(tmp_path / "runs").compare(["star"], "striped_star", 1, "", "", False)
    assert [r[0] for r in rows] == ["base model", "star"], message
    expected = [score_model(name, load_pipeline(str(MODEL_DIR), *weights), subject, "sks", seed=0,
                            images_per_prompt=1)[0] for name, weights in (("base model", []),
                                                                           ("star", [tmp_path / "runs" / "star"]))]
    assert rows == [[r.name, round(r.subject_fidelity, 2), round(r.prompt_fidelity, 2), round(r.language_drift, 2),
                     round(r.class_diversity, 2)] for r in expected]


@pytest.mark.slow
def test_stop_writes_a_checkpoint_and_resume_finishes(server, subject_files):
    from gradio_client import handle_file

    client, root = server
    message, command, current = client.predict(
        name="star-stop", files=[handle_file(f) for f in subject_files], method="lora", class_noun="star",
        steps=60, learning_rate=1e-4, checkpointing_steps=0, validation_steps=0, num_validation_images=1,
        validation_inference_steps=2, api_name="/start")
    assert current == "star-stop", message
    deadline = time.monotonic() + RUN_TIMEOUT
    while len(R.read_metrics(root / "star-stop")) < 2:
        assert time.monotonic() < deadline, client.predict("star-stop", api_name="/poll")[4]
        time.sleep(0.5)
    stopping = client.predict("star-stop", api_name="/stop")
    assert "writes a checkpoint and stops" in stopping, stopping
    assert "stopped" in wait_until_done(client, "star-stop")
    step = len(R.read_metrics(root / "star-stop"))
    assert (root / "star-stop" / "checkpoints" / f"checkpoint-{step}").is_dir()
    assert f"stopped at step {step} of 60" in client.predict("star-stop", api_name="/poll")[4]
    summary = client.predict("star-stop", api_name="/run_details")[0]
    assert summary.startswith(f"stopped: step {step}/60") and command in summary

    message, resumed = client.predict("star-stop", api_name="/resume")
    assert resumed == command + " --resume latest", message
    assert "finished" in wait_until_done(client, "star-stop")
    assert len(R.read_metrics(root / "star-stop")) == 60


@pytest.fixture(scope="module")
def tiny_runs(server, tiny_config, subject_dir, tmp_path_factory):
    """Finished runs on the tiny model in the app's root, trained once in this process for the Runs tab's tests:
    DreamBooth, LoRA, and two Custom Diffusion concepts (<new1> dog, <new2> cat) to merge."""
    from dreamtune.training import train

    _, root = server
    # Set up before the per-test cache isolation (conftest's autouse fixture), so isolated here too.
    patch = pytest.MonkeyPatch()
    patch.setenv("DREAMTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    patch.setenv("HF_HUB_OFFLINE", "1")

    def custom_diffusion(identifier: str, class_noun: str) -> dict:
        return dict(method="custom_diffusion", learning_rate=5e-3, concepts=[
            {"instance_data_dir": str(subject_dir), "class_noun": class_noun, "identifier": identifier}])

    runs = {"tiny-db": dict(method="dreambooth"), "tiny-lora": dict(method="lora"),
            "tiny-cd-dog": custom_diffusion("<new1>", "dog"), "tiny-cd-cat": custom_diffusion("<new2>", "cat")}
    try:
        for name, options in runs.items():
            train(tiny_config(root / name, max_train_steps=2, **options), progress=False)
    finally:
        patch.undo()
    return root


def _image(pipe, prompt: str):
    """One image of `prompt` with the settings the merge test asks the Sample tab for."""
    import numpy as np

    from dreamtune.pipeline import sample

    return np.asarray(sample(pipe, prompt, num_images=1, seed=0, steps=2, guidance=3.0)[0])


def test_export_single_file_loads_in_from_single_file_and_draws_the_same(server, tiny_runs):
    from diffusers import StableDiffusionPipeline

    from dreamtune.pipeline import load_pipeline

    client, _ = server
    message, path = client.predict("tiny-db", api_name="/export")
    assert message.startswith("Exported tiny-db as single-file") and "dreamtune export" in message, message
    artifact = str(tiny_runs / "tiny-db" / "artifact")  # the tiny model's sizes are not standard SD's
    expected = _image(load_pipeline(None, tiny_runs / "tiny-db"), "a photo of sks dog")
    loaded = StableDiffusionPipeline.from_single_file(path, config=artifact, safety_checker=None, local_files_only=True)
    assert (_image(loaded, "a photo of sks dog") == expected).all()


def test_export_kohya_lora_loads_with_load_lora_weights_and_draws_the_same(server, tiny_runs, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    from dreamtune.pipeline import load_pipeline

    client, _ = server
    message, path = client.predict("tiny-lora", api_name="/export_kohya")
    assert message.startswith("Exported tiny-lora as kohya"), message
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)
    expected = _image(load_pipeline(None, tiny_runs / "tiny-lora"), "a photo of sks dog")
    assert (_image(pipe, "a photo of sks dog") == expected).all()

    # A DreamBooth run has no kohya form: the export code's one line, and no file.
    message, _ = client.predict("tiny-db", api_name="/export_kohya")
    assert message.startswith("**Error:**") and "kohya export is for lora" in message and "\n" not in message
    assert not list(tiny_runs.glob(f"{R.UI_DIR}/exports/tiny-db-kohya*"))


def test_merge_two_custom_diffusion_runs_as_dreamtune_merge_does_and_sample_it(server, tiny_runs, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from dreamtune.merge import merge
    from dreamtune.methods.custom_diffusion import WEIGHT_NAME
    from dreamtune.pipeline import load_pipeline

    client, _ = server
    captions = ["a photo of a dog", "a cat on a sofa", "a red car in the street", "a house at night"]
    message = client.predict("tiny-cd-dog", "tiny-cd-cat", "\n".join(captions), "tiny-merged", api_name="/merge")
    assert message.startswith("Merged tiny-cd-dog and tiny-cd-cat"), message
    merged = tiny_runs / "tiny-merged"
    merge([tiny_runs / "tiny-cd-dog", tiny_runs / "tiny-cd-cat"], captions, tmp_path / "library")
    ours, theirs = load_file(merged / WEIGHT_NAME), load_file(tmp_path / "library" / WEIGHT_NAME)
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)

    # The merged run is a run of the Sample tab: both concepts render, as the library renders them.
    assert ["tiny-merged", "finished", "custom_diffusion", "", ""] in client.predict(api_name="/runs")[0]["data"]
    _, gallery, _ = client.predict(run="tiny-merged", prompt="a photo of <new1> dog and <new2> cat", count=1,
                                   seed=0, steps=2, guidance=3.0, api_name="/sample")
    with Image.open(gallery[0]["image"]) as image:
        drawn = np.asarray(image.convert("RGB"))
    assert (drawn == _image(load_pipeline(None, merged), "a photo of <new1> dog and <new2> cat")).all()
    message = client.predict("tiny-cd-dog", "tiny-cd-cat", "a photo of a dog", "tiny-merged", api_name="/merge")
    assert message.startswith("**Error:** merge:") and "not empty" in message


def test_bad_input_is_one_line_and_uploads_are_kept(server, subject_files, tmp_path):
    from gradio_client import handle_file

    client, root = server
    note = tmp_path / "notes.pdf"
    note.write_text("not an image")
    message = client.predict(name="bad-upload", files=[handle_file(subject_files[0]), handle_file(str(note))],
                             class_noun="star", api_name="/start")[0]
    assert message.startswith("**Error:** notes.pdf: not an image") and "\n" not in message
    kept = root / R.UPLOADS / "bad-upload"
    assert sorted(p.name for p in kept.iterdir()) == sorted([Path(subject_files[0]).name, "notes.pdf"])

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG not really")
    message = client.predict(name="bad-image", files=None, folder=str(broken), class_noun="star", api_name="/start")[0]
    assert "a.png: not a readable image" in message  # the CLI's own line

    empty = tmp_path / "empty"
    empty.mkdir()
    message = client.predict(name="no-images", files=None, folder=str(empty), class_noun="star", api_name="/start")[0]
    assert "no images in" in message
    message = client.predict(name="bad-lr", files=None, folder=str(empty), class_noun="star", learning_rate=-1,
                             api_name="/start")[0]
    assert "learning_rate" in message and ">= 0" in message
    message = client.predict(name="../escape", files=None, folder=str(empty), api_name="/start")[0]
    assert "run name" in message
    message = client.predict(run="(base model only)", prompt="", artifact="", negative="", api_name="/sample")[0]
    assert "prompt is empty" in message
    assert R.Jobs(root).running() is None  # nothing was started


def test_compare_evaluates_other_runs_with_dreamtune_eval(make_config, tmp_path):
    from dreamtune.evaluate.tiny_models import save_tiny_clip, save_tiny_dino
    from dreamtune.training import train
    from dreamtune.ui.app import Face

    train(make_config(output_dir=str(tmp_path / "runs" / "dog"), max_train_steps=2), progress=False)
    face = Face(tmp_path / "runs")
    message, table, frame = face.compare(["dog"], "striped_star", 1, str(save_tiny_dino(tmp_path / "dino")),
                                         str(save_tiny_clip(tmp_path / "clip")), True)
    saved = json.loads((tmp_path / "runs" / "dog" / "eval" / "metrics.json").read_text())
    assert table[0][0] == "dog" and table[0][1] == round(saved["summary"]["dino"], 3)
    assert frame.startswith("<iframe") and "report" in frame
    assert "dreamtune eval" in message


def test_train_argv_writes_only_what_differs_from_the_method_defaults():
    from dreamtune import load_config

    defaults = schema.method_defaults("custom_diffusion")
    main = {"method": "custom_diffusion", "max_train_steps": 7, "class_noun": "star", "identifier": "<new1>"}
    advanced = {o.param: defaults.get(o.param, o.default) for o in schema.advanced_options()}
    advanced["lr_scheduler"] = "cosine"
    advanced["validation_prompts"] = '["a {identifier} star"]'
    advanced["custom_diffusion_compress_rank"] = 8
    advanced["lora_rank"] = 16  # another method's option: not for this run
    argv = schema.train_argv(main, advanced, method="custom_diffusion")
    sets = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--set"]
    assert sets == ["method=custom_diffusion", "max_train_steps=7", "concepts.0.identifier=<new1>",
                    "concepts.0.class_noun=star", "lr_scheduler=cosine", 'validation_prompts=["a {identifier} star"]',
                    "custom_diffusion.compress_rank=8"]
    config = load_config(None, overrides=sets)
    assert config.method_options.compress_rank == 8 and config.learning_rate == defaults["learning_rate"]


def test_run_status_from_the_folder_and_the_job_record(tmp_path):
    root = tmp_path
    (root / "done" / "artifact").mkdir(parents=True)
    (root / "done" / "artifact" / "dreamtune.json").write_text("{}")
    (root / "half" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    R.jobs_dir(root).mkdir(parents=True)
    (R.jobs_dir(root) / "broken.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "argv": []}))
    (R.jobs_dir(root) / "broken.log").write_text("loading\ndreamtune: error: concepts[0].instance_data_dir: no images\n")
    # Stopped by Ctrl-C or SIGTERM sent from a terminal rather than the Stop button: stopped, not failed.
    (R.jobs_dir(root) / "interrupted.json").write_text(json.dumps({"pid": 2 ** 22 + 8, "argv": []}))
    (R.jobs_dir(root) / "interrupted.log").write_text(
        "dreamtune: stopped at step 3 of 9; checkpoint runs/interrupted/checkpoints/checkpoint-3. Continue ...\n")
    (root / "uploads" / "x").mkdir(parents=True)  # not a run
    statuses = {i.name: (i.status, i.error) for i in R.list_runs(root)}
    assert statuses == {"done": ("finished", ""), "half": ("stopped", ""), "interrupted": ("stopped", ""),
                        "broken": ("failed", "concepts[0].instance_data_dir: no images")}


def test_a_job_is_alive_while_its_process_runs_and_not_once_it_ended_unreaped():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert R._alive(child.pid) and R._alive(os.getpid())
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while R._alive(child.pid):  # ended but not reaped yet (a zombie): not running
            assert time.monotonic() < deadline, "a killed process still counts as running"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert not R._alive(child.pid) and not R._alive(None) and not R._alive(2 ** 22 + 9)


# ---- in a real browser ----

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PAGE_TIMEOUT = 60


def wait_for(driver, what: str, condition, timeout: float = PAGE_TIMEOUT):
    """Poll `condition(driver)` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = condition(driver)
            if result:
                return result
        except Exception as e:  # the page is re-rendering: try again until the deadline
            last_error = e
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout:.0f} s for {what}" + (f" (last error: {last_error})" if last_error else ""))


def field(driver, elem_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")


def type_into(driver, elem_id: str, text: str, then: str | None = None) -> None:
    """Replace a field's text, then leave it (Tab) so the page takes the value."""
    from selenium.webdriver.common.keys import Keys

    box = field(driver, elem_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(then or Keys.TAB)


def text_of(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, elem_id).text


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    tab = wait_for(driver, f"the {name} tab", lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                                         if b.text.strip() == name])
    tab[0].click()


@pytest.mark.browser
def test_train_sample_and_runs_in_a_browser(tmp_path):
    """Opt-in (`-m browser`; `.ci/run` runs it): upload a shapes-world subject's images, train, wait for the
    validation grid, sample, read the run list, with a screenshot at each stage in the test's output folder
    (and in $DREAMTUNE_UI_SCREENSHOTS when set: the README's screenshots). Every wait is bounded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from dreamtune.ui.app import launch
    from dreamtune.world import write_subject_images

    shots = tmp_path / "screenshots"
    shots.mkdir()
    extra = os.environ.get("DREAMTUNE_UI_SCREENSHOTS")

    def screenshot(driver, name: str) -> None:
        driver.save_screenshot(str(shots / f"{name}.png"))
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shots / f"{name}.png", Path(extra) / f"{name}.png")

    subject = tmp_path / "subject"
    write_subject_images("striped_star", subject)
    root = tmp_path / "runs"
    port = free_port()
    app = launch(root, port=port, block=False)
    started = time.monotonic()
    driver = None
    try:
        driver = _start_browser()
        driver.get(f"http://127.0.0.1:{port}/")
        wait_for(driver, "the Start button", lambda d: d.find_element(By.ID, "dt-start").is_displayed())

        type_into(driver, "dt-run-name", "striped-star")
        type_into(driver, "dt-class-noun", "star")
        type_into(driver, "dt-steps", "5")
        upload = driver.find_element(By.CSS_SELECTOR, "#dt-files input[type=file]")
        upload.send_keys("\n".join(str(p) for p in sorted(subject.glob("*.png"))))
        wait_for(driver, "the 5 uploaded images to be listed",
                 lambda d: len([e for e in d.find_elements(By.CSS_SELECTOR, "#dt-files tr") if ".png" in e.text]) >= 5)
        screenshot(driver, "1-train")

        driver.find_element(By.ID, "dt-start").click()
        wait_for(driver, "the run to start", lambda d: "Started run 'striped-star'" in text_of(d, "dt-message"))
        wait_for(driver, "the validation grid and 'finished'",
                 lambda d: "finished" in text_of(d, "dt-status") and d.find_elements(By.CSS_SELECTOR, "#dt-grids img"),
                 timeout=RUN_TIMEOUT)
        screenshot(driver, "2-trained")

        open_tab(driver, "Sample")
        type_into(driver, "dt-sample-run", "striped-star")
        type_into(driver, "dt-prompt", "a photo of a sks star on a green background")
        driver.find_element(By.ID, "dt-generate").click()
        wait_for(driver, "4 sampled images", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#dt-gallery img")) >= 4,
                 timeout=RUN_TIMEOUT)
        assert "dreamtune sample --weights" in text_of(driver, "dt-sample-message")
        screenshot(driver, "3-sample")

        open_tab(driver, "Compare")
        type_into(driver, "dt-compare-runs", "striped-star", Keys.ENTER)
        type_into(driver, "dt-compare-per-prompt", "1")
        driver.find_element(By.ID, "dt-compare").click()
        wait_for(driver, "the oracle table", lambda d: "striped-star" in text_of(d, "dt-compare-table")
                 and "base model" in text_of(d, "dt-compare-table"), timeout=RUN_TIMEOUT)
        screenshot(driver, "4-compare")

        open_tab(driver, "Runs")
        driver.find_element(By.ID, "dt-refresh").click()
        wait_for(driver, "the run list to show the finished run",
                 lambda d: "striped-star" in text_of(d, "dt-runs") and "finished" in text_of(d, "dt-runs"))
        type_into(driver, "dt-selected", "striped-star")
        wait_for(driver, "the run's config", lambda d: "max_train_steps = 5" in text_of(d, "dt-config"))
        screenshot(driver, "5-runs")
        print(f"browser test: {time.monotonic() - started:.0f} s; screenshots in {shots}")
    except Exception:
        if driver is not None:
            driver.save_screenshot(str(shots / "failure.png"))
            print(f"screenshot of the failure: {shots / 'failure.png'}")
        raise
    finally:
        if driver is not None:
            driver.quit()
        kill_jobs(root)
        app.close()


def _start_browser():
    """Headless chromium through chromedriver; one retry, since a first start on a cold machine can time out."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the browser test needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    for attempt in range(2):
        try:
            driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
            driver.set_page_load_timeout(PAGE_TIMEOUT)
            return driver
        except WebDriverException as e:
            if attempt:
                raise AssertionError(f"chromium did not start through chromedriver: {e.msg}") from None
            time.sleep(2)
