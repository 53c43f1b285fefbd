"""The list `tools/mutate.py` runs: one entry per feature, each a realistic bug (`replacement` in place of
the exact `pattern`, which occurs once in `file`) and the tests that must fail with it. How to add one:
see tools/mutate.py's docstring. `tests/test_mutations.py` checks in the suite that every entry applies."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutation:
    id: str
    feature: str
    file: str
    pattern: str
    replacement: str
    tests: list[str] = field(default_factory=list)
    k: str | None = None  # a pytest -k expression added to the node ids
    timeout: int = 600  # seconds for the tests of this entry


MUTATIONS: list[Mutation] = [
    # ----------------------------------------------------------------------- issue 28: the survivors
    Mutation(
        id="resume-restored-guard",
        feature="a resumed process keeps its restored (or (seed, rank, step)) random stream at fit start",
        file="distill/training/fault_tolerance.py",
        pattern="""        if self._restored:
            return
        seed = run_seed()""",
        replacement="""        seed = run_seed()""",
        tests=["tests/test_resume.py::test_a_resumed_process_keeps_its_restored_stream_at_fit_start"],
    ),
    Mutation(
        id="dkd-warmup-by-epoch",
        feature="DKD's warm-up factor follows the epoch, not the optimizer step, inside a fit",
        file="distill/student/module.py",
        pattern="self.loss.set_epoch(self.current_epoch)",
        replacement="self.loss.set_epoch(self.global_step)",
        tests=["tests/test_losses.py::test_stronger_losses_in_a_distill_module_fit[dkd]"],
    ),
    Mutation(
        id="head-dist-zero-init",
        feature="a plain ViT made a distilled student gets a zero-initialised head_dist",
        file="distill/models/pretrained.py",
        pattern="""_zero_new_classifiers(model, [k for k in missing if k in heads or k.startswith("head_dist.")])""",
        replacement="""_zero_new_classifiers(model, [])""",
        tests=["tests/test_pretrained.py::test_plain_vit_initialises_a_distilled_student"],
    ),
    Mutation(
        id="cache-fingerprint-before-cast",
        feature="the cache identifies a bfloat16-kept teacher by its float32 weights (fingerprint before the cast)",
        file="distill/student/module.py",
        pattern="""            if use_cache:
                self.teacher.fingerprint()  # before any dtype cast: the cache identifies the teacher by it
            self.teacher.prepare(self._teacher_dtype(), hp.teacher_channels_last, hp.compile_teacher)""",
        replacement="""            self.teacher.prepare(self._teacher_dtype(), hp.teacher_channels_last, hp.compile_teacher)
            if use_cache:
                self.teacher.fingerprint()""",
        tests=["tests/test_teacher_cache.py::test_a_bfloat16_teacher_builds_and_verifies_its_cache"],
    ),
    Mutation(
        id="steps-per-epoch-round-up",
        feature="the lr schedule counts the epoch's last, partial accumulation as an optimizer step",
        file="distill/training/optim.py",
        pattern="""math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches))""",
        replacement="""int(batches) // max(1, trainer.accumulate_grad_batches)""",
        tests=["tests/test_optim.py::test_an_odd_number_of_batches_under_accumulation_rounds_the_epoch_up"],
    ),
    Mutation(
        id="model-card-teacher-row",
        feature="the model card's teacher row shows the teacher's accuracy",
        file="distill/sharing/model_card.py",
        pattern="""("teacher", "val/acc_teacher"),""",
        replacement="""("teacher", "val/acc"),""",
        tests=["tests/test_hub.py::test_model_card_results_rows_read_their_own_metrics"],
    ),
    Mutation(
        id="source-keeps-interpolation",
        feature="a local-dir:/hf-hub: teacher keeps the interpolation its config.json records",
        file="distill/models/sources.py",
        pattern="""interpolation=pcfg.get("interpolation"),""",
        replacement="""interpolation=None,""",
        tests=["tests/test_hub.py::test_a_bicubic_teacher_exported_and_reloaded_keeps_its_interpolation"],
    ),
    Mutation(
        id="push-names-card-before-upload",
        feature="distill push names the repository in the card before the upload reads it",
        file="distill/sharing/hub.py",
        pattern="""    _name_repo_in_card(path, repo_id)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(path), repo_type="model", commit_message=commit_message,
                          ignore_patterns=[".*", "*.tmp"])""",
        replacement="""    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(path), repo_type="model", commit_message=commit_message,
                          ignore_patterns=[".*", "*.tmp"])
        _name_repo_in_card(path, repo_id)""",
        tests=["tests/test_hub.py::test_push_creates_the_repo_then_uploads_the_folder_in_one_commit"],
    ),
    Mutation(
        id="bf16-mixed-teacher-default",
        feature="teacher_dtype null keeps the teacher in bfloat16 under precision bf16-mixed",
        file="distill/student/module.py",
        pattern='str(self.trainer.precision) == "bf16-mixed"',
        replacement='str(self.trainer.precision) == "bf16-true"',
        tests=["tests/test_speed_options.py::test_the_teacher_dtype_follows_the_precision_by_default"],
    ),
    Mutation(
        id="cache-verify-tolerance-by-precision",
        feature="cache verification allows 16-bit rounding only when a pass ran in 16 bits",
        file="distill/teacher/cache.py",
        pattern="""reduced = any(p and ("16" in str(p)) for p in (self.manifest.get("precision"), live_precision))""",
        replacement="""reduced = True""",
        tests=["tests/test_teacher_cache.py::test_a_float32_cache_one_percent_off_is_refused_unless_a_16_bit_pass_explains_it",
               "tests/test_teacher_cache.py::test_cache_that_disagrees_with_live_teacher_is_refused"],
    ),
    Mutation(
        id="teacher-file-sha256-check",
        feature="model.teacher_sha256 refuses a teacher file with another digest, also in a fresh run",
        file="distill/teacher/frozen.py",
        pattern="""        digest = sha256_of(path)
        if expected_sha256 and digest != expected_sha256:""",
        replacement="""        digest = sha256_of(path)
        if False:""",
        tests=["tests/test_student.py::test_a_fresh_run_with_a_wrong_teacher_sha256_is_refused"],
    ),
    Mutation(
        id="teacher-source-sha256-check",
        feature="model.teacher_sha256 refuses a local-dir:/hf-hub: teacher whose weights changed",
        file="distill/teacher/frozen.py",
        pattern="""        digest = sha256_of(src.weights_file)
        if expected_sha256 and digest != expected_sha256:""",
        replacement="""        digest = sha256_of(src.weights_file)
        if False:""",
        tests=["tests/test_hub.py::test_a_bicubic_teacher_exported_and_reloaded_keeps_its_interpolation"],
    ),
    Mutation(
        id="study-drops-former-teacher-runs",
        feature="the study runner (tools/reproduce.py run_study) keeps only the current teacher's runs",
        file="tools/reproduce.py",
        pattern="""                           if (r.get("teacher_sha256") or teacher_sha) == teacher_sha]""",
        replacement="""                           ]""",
        tests=["tests/test_reproduce.py::test_the_study_itself_drops_the_runs_of_a_changed_given_teacher"],
    ),
]
