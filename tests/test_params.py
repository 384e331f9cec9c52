"""Bad parameters fail through the real `luigi` command before any stage runs, naming the valid values."""
import pytest

from tests.conftest import luigi_command, repo_config, tiny_config, write_config

CASES = {
    "unknown model": (["--Train-model-def", "resnet"], "model_def='resnet'", "alexnet, cnn, dnn, premade_dnn"),
    "params not JSON": (["--Train-params", "{learning_rate: 1}"], "is not valid JSON",
                        '\'{"learning_rate": 0.0005}\''),
    "params not an object": (["--Train-params", "[1, 2]"], "is a JSON list", "expected a JSON object"),
    "unknown params key": (["--Train-params", '{"dropout": 0.5}'], "['dropout'], unknown to cnn.py",
                           "conv_filters, dense_units, dropout_rate, kernel_size, learning_rate"),
    "zero steps": (["--Train-max-steps", "0"], "max_steps=0", "expected a positive integer"),
    "negative steps": (["--Train-max-steps", "-5"], "max_steps=-5", "expected a positive integer"),
    "fractions leave no train split": (["--Convert-validation-fraction", "0.5", "--Convert-test-fraction", "0.5"],
                                       "validation_fraction + test_fraction = 1.0", "expected less than 1"),
    "negative fraction": (["--Convert-test-fraction", "-0.1"], "test_fraction=-0.1", "in [0, 1)"),
    "zero image size": (["--Convert-image-size", "0"], "image_size=0", "positive number of pixels"),
    "JPEG quality above 100": (["--Convert-jpeg-quality", "101"], "jpeg_quality=101", "from 1 to 100"),
    "unknown image format": (["--Convert-image-format", "webp"], "webp is not a valid choice", "'jpeg'"),
    "unsupported scheme": (["--Download-source-url", "ftp://example.org/images.tar.gz"], "scheme 'ftp'",
                           "expected one of http, https, file"),
    "unknown split": (["--Evaluate-split", "holdout"], "holdout is not a valid choice", "'validation'"),
}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, mnist_subset):
    folder = tmp_path_factory.mktemp("params")
    sections = tiny_config(folder, mnist_subset.as_uri())
    sections["retcode"] = repo_config()["retcode"]
    return write_config(folder / "luigi.cfg", sections)


@pytest.mark.parametrize("case", CASES)
def test_bad_parameter_fails_before_any_work(case, config_path):
    args, problem, valid = CASES[case]
    result = luigi_command(config_path.parent, config_path, "RunAll", *args)
    assert result.returncode != 0
    assert problem in result.stderr and valid in result.stderr, result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert not (config_path.parent / "data").exists(), "a stage ran before the parameter was refused"
