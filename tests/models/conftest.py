from tests.train.conftest import stage_dir, tiny_inpaint, tiny_sd2, tiny_sd3, tiny_sd15, tiny_sdxl  # noqa: F401 (shared session fixtures)
