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
    uploaded, left_out = upload_plan(path)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # exact names: huggingface_hub matches patterns against paths relative to the folder, so nothing
        # in a subfolder and no other top-level file matches
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(path), repo_type="model", commit_message=commit_message,
                          allow_patterns=uploaded)""",
        replacement="""    uploaded, left_out = upload_plan(path)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(path), repo_type="model", commit_message=commit_message,
                          allow_patterns=uploaded)
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
        feature="the study runner (distill study's run_study) keeps only the current teacher's runs",
        file="distill/commands/study_runs.py",
        pattern="""                           if (r.get("teacher_sha256") or teacher_sha) == teacher_sha]""",
        replacement="""                           ]""",
        tests=["tests/test_study.py::test_the_study_itself_drops_the_runs_of_a_changed_given_teacher"],
    ),
    Mutation(
        id="cache-lock-per-shard",
        feature="each DDP rank builds its cache shard under its own lock (one shared lock deadlocks the job)",
        file="distill/teacher/cache.py",
        pattern='path = directory / f".build-{rank:04d}.lock"',
        replacement='path = directory / ".build.lock"',
        tests=["tests/test_distributed.py::test_one_wandb_run_per_job_and_teacher_cache_sharded_by_process"],
    ),
    # ------------------------------------------------------- issue 28: the weak tests, strengthened
    Mutation(
        id="ema-after-the-optimizer-step",
        feature="the EMA of the student averages the weights after each optimizer step",
        file="distill/student/module.py",
        pattern="""    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step (never after a micro-batch that only accumulated), and inside the
        # step: a step checkpoint, written by a callback at the batch's end before the module's own
        # on_train_batch_end, then holds the EMA of the weights it holds, so a resume continues it
        # exactly. Lightning counts the step (global_step) after this hook returns.
        if self.student_ema is not None:
            self.student_ema.update(self.student, step=self.global_step + 1)""",
        replacement="""    def optimizer_step(self, *args, **kwargs) -> None:
        if self.student_ema is not None:
            self.student_ema.update(self.student, step=self.global_step + 1)
        super().optimizer_step(*args, **kwargs)""",
        tests=["tests/test_student.py::test_ema_logs_acc_ema_and_copies_only_the_student"],
    ),
    Mutation(
        id="epoch-line-loss-is-the-epochs-mean",
        feature="the one-line-per-epoch log prints that epoch's mean training loss",
        file="distill/training/progress.py",
        pattern="self._loss_sum, self._batches, self._validated = None, 0, False",
        replacement="self._validated = False",
        tests=["tests/test_progress_output.py::test_a_log_file_gets_one_line_per_epoch_and_no_carriage_returns"],
    ),
    Mutation(
        id="device-loader-mixes-the-images",
        feature="the on-device loader's mixup/cutmix mixes the images, not only the targets",
        file="distill/data/device_loader.py",
        pattern="x, y = self.mixup_fn(x, y)",
        replacement="x, y = x, self.mixup_fn(x.clone(), y)[1]",
        tests=["tests/test_device_data.py::test_mixup_on_device_batches"],
    ),
    Mutation(
        id="teacher-input-bilinear-upsampling",
        feature="a teacher trained at a larger size gets the student's batch upsampled with its interpolation",
        file="distill/teacher/frozen.py",
        pattern='TORCH_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear",',
        replacement='TORCH_MODES = {"nearest": "nearest-exact", "bilinear": "nearest-exact",',
        tests=["tests/test_student.py::test_teacher_with_other_mean_std_size_and_channels_gets_converted_input"],
    ),
    Mutation(
        id="cache-float16-storage-tolerance",
        feature="a float16 cache may differ from the live teacher by float16's rounding, not by 1%",
        file="distill/teacher/cache.py",
        pattern='rtol = {"float16": 2e-3, "float32": 1e-5}',
        replacement='rtol = {"float16": 2e-2, "float32": 1e-5}',
        tests=["tests/test_teacher_cache.py::test_cache_that_disagrees_with_live_teacher_is_refused"],
    ),
    Mutation(
        id="alpha-weighs-the-distillation-term",
        feature="alpha is the weight of the distillation term, (1 - alpha) the CE's (DeiT)",
        file="distill/losses.py",
        pattern="total = (1.0 - self.alpha) * ce + (self.alpha * self.warmup_factor) * distill",
        replacement="total = self.alpha * ce + ((1.0 - self.alpha) * self.warmup_factor) * distill",
        tests=["tests/test_losses.py::test_alpha_bounds_are_inclusive", "tests/test_losses.py::test_total_is_weighted_sum"],
    ),
    Mutation(
        id="val-acc-teacher-is-the-teachers",
        feature="val/acc_teacher is the teacher's accuracy, not the student's",
        file="distill/student/module.py",
        pattern='metrics["acc_teacher"].update(z_t, y)',
        replacement='metrics["acc_teacher"].update(fused, y)',
        tests=["tests/test_student.py::test_validation_metrics_are_each_heads_accuracy_counted_by_hand",
               "tests/test_speed_options.py::test_teacher_kept_in_bfloat16",
               "tests/test_pipeline.py::test_pipeline_runs_both_steps_and_writes_summary"],
    ),
    Mutation(
        id="val-acc-is-the-fused-heads",
        feature="val/acc is the accuracy of the two heads fused (the mean of their logits), as DeiT evaluates",
        file="distill/student/module.py",
        pattern="        fused = (z_cls + z_dist) / 2",
        replacement="        fused = z_cls",
        tests=["tests/test_student.py::test_validation_metrics_are_each_heads_accuracy_counted_by_hand"],
    ),
    Mutation(
        id="val-acc-dist-is-the-distillation-head",
        feature="val/acc_dist is the distillation head's accuracy",
        file="distill/student/module.py",
        pattern='metrics["acc_dist"].update(z_dist, y)',
        replacement='metrics["acc_dist"].update(z_cls, y)',
        tests=["tests/test_student.py::test_validation_metrics_are_each_heads_accuracy_counted_by_hand"],
    ),
    Mutation(
        id="val-agreement-of-the-fused-heads",
        feature="val/agreement compares the fused heads' argmax with the teacher's",
        file="distill/student/module.py",
        pattern='metrics["agreement"].update(fused, z_t.argmax(-1))',
        replacement='metrics["agreement"].update(z_dist, z_t.argmax(-1))',
        tests=["tests/test_student.py::test_validation_metrics_are_each_heads_accuracy_counted_by_hand",
               "tests/test_pipeline.py::test_pipeline_runs_both_steps_and_writes_summary"],
    ),
    Mutation(
        id="pipeline-skipped-teacher-accuracy",
        feature="with step 1 skipped, the pipeline summary's teacher accuracy is step 2's val/acc_teacher",
        file="distill/commands/pipeline.py",
        pattern='summary["teacher"]["val/acc"] = metrics.get("val/acc_teacher")',
        replacement='summary["teacher"]["val/acc"] = metrics.get("val/acc")',
        tests=["tests/test_pipeline.py::test_the_summary_takes_each_number_from_its_own_metric",
               "tests/test_cli_routes.py::test_pipeline_with_a_plain_safetensors_teacher"],
    ),
    Mutation(
        id="train-loss-logs-the-total",
        feature="train/loss logs the weighted total, also under DDP with an unused head",
        file="distill/student/module.py",
        pattern='self.log("train/loss", total, prog_bar=True)',
        replacement='self.log("train/loss", terms.ce, prog_bar=True)',
        tests=["tests/test_distributed.py::test_student_with_an_unused_head_trains_under_ddp[alpha1]"],
    ),
    # ------------------------------------------------------------------------------------ losses
    Mutation(
        id="soft-kd-tau-squared",
        feature="the soft (Hinton/DeiT) term is multiplied by tau**2",
        file="distill/losses.py",
        pattern="return kl * (tau * tau) / denominator",
        replacement="return kl / denominator",
        tests=["tests/test_losses.py::test_fixed_values", "tests/test_losses.py::test_soft_matches_reference_formulas"],
    ),
    Mutation(
        id="soft-kd-deit-reduction",
        feature="kl_reduction deit divides the summed KL by batch x classes, batchmean by the batch",
        file="distill/losses.py",
        pattern='denominator = student_logits.numel() if kl_reduction == "deit" else student_logits.shape[0]',
        replacement="denominator = student_logits.shape[0]",
        tests=["tests/test_losses.py::test_fixed_values"],
    ),
    Mutation(
        id="hard-kd-teacher-argmax",
        feature="hard distillation is CE against the teacher's argmax label",
        file="distill/losses.py",
        pattern="return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))",
        replacement="return F.cross_entropy(student_logits.float(), teacher_logits.softmax(dim=-1))",
        tests=["tests/test_losses.py::test_hard_uses_teacher_argmax", "tests/test_losses.py::test_fixed_values"],
    ),
    Mutation(
        id="hard-kd-not-label-smoothed",
        feature="label smoothing applies to the ground-truth term only, never to the teacher's",
        file="distill/losses.py",
        pattern="distill = hard_distillation(z_dist, teacher_logits)",
        replacement="distill = F.cross_entropy(z_dist.float(), teacher_logits.argmax(-1), label_smoothing=self.label_smoothing)",
        tests=["tests/test_losses.py::test_hard_term_is_not_label_smoothed"],
    ),
    Mutation(
        id="dkd-masks-the-target-class",
        feature="DKD's NCKD is the KL over the non-target classes (target logit masked by 1000)",
        file="distill/losses.py",
        pattern="masked = DKD_MASK * gt.float()",
        replacement="masked = 0.0 * gt.float()",
        tests=["tests/test_losses.py::test_dkd_matches_mdistiller"],
    ),
    Mutation(
        id="dkd-tckd-nckd-weights",
        feature="DKD weighs TCKD by dkd_alpha and NCKD by dkd_beta",
        file="distill/losses.py",
        pattern="return tckd_weight * tckd * scale + nckd_weight * nckd * scale",
        replacement="return nckd_weight * tckd * scale + tckd_weight * nckd * scale",
        tests=["tests/test_losses.py::test_dkd_matches_mdistiller",
               "tests/test_losses.py::test_dkd_with_beta_zero_is_tckd_alone_and_terms_add_linearly"],
    ),
    Mutation(
        id="dkd-soft-targets-argmax",
        feature="DKD takes the dominant class of mixup/cutmix soft targets as the target",
        file="distill/losses.py",
        pattern="target = target.argmax(dim=-1)",
        replacement="target = target.argmin(dim=-1)",
        tests=["tests/test_losses.py::test_dkd_soft_targets_use_their_argmax"],
    ),
    Mutation(
        id="dist-intra-class-relation",
        feature="DIST's intra term correlates each class's column across the batch",
        file="distill/losses.py",
        pattern="intra = 1.0 - _pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()",
        replacement="intra = 1.0 - _pearson_rows(y_s, y_t).mean()",
        tests=["tests/test_losses.py::test_dist_matches_authors_code"],
    ),
    Mutation(
        id="standardised-logits-unit-std",
        feature="logit standardisation divides by the per-sample std (z-score)",
        file="distill/losses.py",
        pattern="return (logits - mean) / (1e-7 + std)",
        replacement="return logits - mean",
        tests=["tests/test_losses.py::test_standardised_logits_have_zero_mean_and_unit_unbiased_std",
               "tests/test_losses.py::test_standardised_soft_matches_authors_kd_loss"],
    ),
    Mutation(
        id="distillation-token-head-order",
        feature="the loss reads the class head for CE and the distillation head for the teacher term",
        file="distill/losses.py",
        pattern="            z_cls, z_dist = student_out",
        replacement="            z_dist, z_cls = student_out",
        tests=["tests/test_losses.py::test_gradients_reach_only_the_weighted_heads"],
    ),
    # ----------------------------------------------------------------- the distillation-token heads
    Mutation(
        id="student-heads-token-order",
        feature="student_heads: the class token feeds head, the distillation token head_dist",
        file="distill/models/heads.py",
        pattern="return student.head(feats[:, 0]), student.head_dist(feats[:, 1])",
        replacement="return student.head(feats[:, 1]), student.head_dist(feats[:, 0])",
        tests=["tests/test_models.py::test_student_heads_in_eval_mode"],
    ),
    Mutation(
        id="export-single-head-doubles-the-kept-head",
        feature="an export of one head doubles it and zeroes the other, so the fused output is that head",
        file="distill/models/heads.py",
        pattern='sd[f"{keep}.{p}"] = sd[f"{keep}.{p}"] * 2',
        replacement='sd[f"{keep}.{p}"] = sd[f"{keep}.{p}"] * 1',
        tests=["tests/test_hub.py::test_student_export_loads_in_timm_with_the_checkpoints_logits_and_transform"],
    ),
    Mutation(
        id="predict-fused-is-the-mean-of-logits",
        feature="predict's fused head is the softmax of the mean logits (what timm's model returns)",
        file="distill/models/heads.py",
        pattern='"fused": ((z_cls + z_dist) / 2).softmax(-1)}',
        replacement='"fused": (z_cls.softmax(-1) + z_dist.softmax(-1)) / 2}',
        tests=["tests/test_predict.py::test_probabilities_equal_a_direct_forward"],
    ),
    # ------------------------------------------------------------------------- keyed views replay
    Mutation(
        id="keyed-view-seed-has-the-view",
        feature="each view of a sample is its own augmentation, seeded by (seed, view, index)",
        file="distill/data/keyed_views.py",
        pattern='f"{seed}/{view}/{index}"',
        replacement='f"{seed}/{index}"',
        tests=["tests/test_teacher_cache.py::test_keyed_views_replay_bit_identically"],
    ),
    Mutation(
        id="keyed-view-restores-the-rng",
        feature="drawing a keyed view leaves the process's random state as it was",
        file="distill/data/keyed_views.py",
        pattern="        torch.set_rng_state(th)",
        replacement="        pass",
        tests=["tests/test_teacher_cache.py::test_keyed_views_replay_bit_identically"],
    ),
    Mutation(
        id="keyed-sampler-skips-the-trained-batches",
        feature="a resumed keyed epoch skips the samples already trained, once",
        file="distill/data/keyed_views.py",
        pattern="indices = islice(indices, self._skip[1], None)",
        replacement="indices = islice(indices, 0, None)",
        tests=["tests/test_resume.py::test_view_key_sampler_skips_the_trained_part_of_one_epoch_once"],
    ),
    Mutation(
        id="keyed-loader-position-in-samples",
        feature="the keyed loader's saved position (batches) is converted to samples on load",
        file="distill/data/keyed_views.py",
        pattern='self.sampler.skip_once(state["epoch"], state["batches"] * self.batch_size)',
        replacement='self.sampler.skip_once(state["epoch"], state["batches"])',
        tests=["tests/test_resume.py::test_keyed_loader_state_round_trip_replays_the_rest_of_the_epoch"],
    ),
    # -------------------------------------------------------------------- teacher-output cache
    Mutation(
        id="cache-topk-tail-mass",
        feature="a top-k cache spreads the remaining probability mass evenly over the other classes",
        file="distill/teacher/cache.py",
        pattern="fill = lse + rest - math.log(num_classes - k)",
        replacement="fill = lse + rest",
        tests=["tests/test_teacher_cache.py::test_topk_round_trip_keeps_topk_probabilities"],
    ),
    Mutation(
        id="cache-topk-auto-by-loss",
        feature="topk auto stores every logit for losses that read the whole distribution",
        file="distill/teacher/cache.py",
        pattern="cfg = replace(cfg, topk=10 if argmax_only else None)",
        replacement="cfg = replace(cfg, topk=10)",
        tests=["tests/test_teacher_cache.py::test_a_topk_cache_built_by_a_hard_run_is_refused_by_a_soft_run"],
    ),
    Mutation(
        id="cache-shard-of-a-sample",
        feature="sample i is read from shard i % world, row i // world",
        file="distill/teacher/cache.py",
        pattern="shard, row = idx % self.world, idx // self.world",
        replacement="shard, row = idx // self.world, idx % self.world",
        tests=["tests/test_teacher_cache.py::test_full_logits_round_trip_equals_live_teacher"],
    ),
    Mutation(
        id="cache-refuses-another-teacher",
        feature="a cache built for another teacher (weights, input) is refused as stale",
        file="distill/teacher/cache.py",
        pattern='("teacher", ("teacher",)),',
        replacement="",
        tests=["tests/test_teacher_cache.py::test_stale_cache_is_refused"],
    ),
    Mutation(
        id="cache-verified-on-first-batches",
        feature="the first verify_batches training batches are checked against the live teacher",
        file="distill/teacher/cache.py",
        pattern="            self.cache.verify(z, teacher(x), self.precision)",
        replacement="            pass",
        tests=["tests/test_teacher_cache.py::test_cache_that_disagrees_with_live_teacher_is_refused"],
    ),
    # ------------------------------------------------------------------------------ resume
    Mutation(
        id="resume-own-rank-state",
        feature="on resume each process takes its own rank's random state from the checkpoint",
        file="distill/training/fault_tolerance.py",
        pattern='self._resumed = state["ranks"][rank]',
        replacement='self._resumed = state["ranks"][0]',
        tests=["tests/test_resume.py::test_each_process_takes_its_own_state_from_the_checkpoint"],
    ),
    Mutation(
        id="resume-reseed-key-has-the-step",
        feature="after a world-size change each process reseeds from (seed, rank, step)",
        file="distill/training/fault_tolerance.py",
        pattern="""key = f"{run_seed() or 0}/{rank}/{int(state['global_step'])}".encode()""",
        replacement="""key = f"{run_seed() or 0}/{rank}".encode()""",
        tests=["tests/test_resume.py::test_resume_with_another_number_of_processes_warns_and_reseeds"],
    ),
    Mutation(
        id="atomic-checkpoint-write",
        feature="checkpoints are written to a temporary file and renamed over the target",
        file="distill/training/fault_tolerance.py",
        pattern='tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")',
        replacement="tmp = path",
        tests=["tests/test_faults.py::test_atomic_write_replaces_the_file_and_leaves_no_temporary",
               "tests/test_faults.py::test_killed_checkpoint_write_leaves_previous_checkpoint_whole"],
    ),
    Mutation(
        id="last-checkpoint-is-the-last-state",
        feature="last.ckpt is refreshed at every epoch's end, also after the best epoch",
        file="distill/training/fault_tolerance.py",
        pattern="""        if self._should_save_on_train_epoch_end(trainer) or self._last_step != trainer.global_step:
            self._save_last_unless_saved(trainer, before)""",
        replacement="""        if self._should_save_on_train_epoch_end(trainer) or self._last_step != trainer.global_step:
            pass""",
        tests=["tests/test_resume.py::test_last_checkpoint_is_the_last_state_when_the_metric_peaked_early",
               "tests/test_resume.py::test_last_checkpoint_holds_the_validation_after_a_step_checkpoint_at_the_same_step"],
    ),
    Mutation(
        id="last-checkpoint-after-a-mid-epoch-validation",
        feature="last.ckpt is refreshed after a validation that does not end an epoch (val_check_interval < 1)",
        file="distill/training/fault_tolerance.py",
        pattern="""        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_unless_saved(trainer, before)""",
        replacement="""        if not self._should_save_on_train_epoch_end(trainer):
            pass""",
        tests=["tests/test_resume.py::test_last_checkpoint_follows_each_validation_inside_an_epoch"],
    ),
    Mutation(
        id="resume-refuses-a-changed-teacher",
        feature="resuming with a teacher file whose sha256 changed is refused",
        file="distill/student/module.py",
        pattern='if was.get("sha256") and now.get("sha256") and was["sha256"] != now["sha256"]:',
        replacement="if False:",
        tests=["tests/test_student.py::test_resume_reloads_teacher_and_refuses_a_changed_one"],
    ),
    # ----------------------------------------------------------------------------- the teacher
    Mutation(
        id="teacher-never-in-train-mode",
        feature="the frozen teacher never leaves eval mode (BatchNorm statistics never move)",
        file="distill/teacher/frozen.py",
        pattern="return super().train(False)  # frozen for good",
        replacement="return super().train(mode)  # frozen for good",
        tests=["tests/test_student.py::test_teacher_frozen_through_fit_and_validate"],
    ),
    Mutation(
        id="student-checkpoint-without-teacher",
        feature="student checkpoints hold no teacher weights (the teacher is reloaded from its file)",
        file="distill/student/module.py",
        pattern='checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}',
        replacement='checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()}',
        tests=["tests/test_student.py::test_checkpoint_without_teacher_weights_records_its_identity"],
    ),
    Mutation(
        id="teacher-class-names-checked",
        feature="a teacher whose class names differ in order or name from the data's is refused",
        file="distill/teacher/frozen.py",
        pattern='if meta["class_names"] is not None and list(meta["class_names"]) != list(class_names):',
        replacement="if False:",
        tests=["tests/test_student.py::test_teacher_with_other_class_names_refused"],
    ),
    Mutation(
        id="teacher-input-downsampling-plain",
        feature="downsampling for a smaller teacher is plain (no antialias): it inverts an integer upsampling",
        file="distill/teacher/frozen.py",
        pattern="            x = self._resize(x, size, antialias=False)\n        return (x - self.dst_mean",
        replacement="            x = self._resize(x, size, antialias=True)\n        return (x - self.dst_mean",
        tests=["tests/test_student.py::test_teacher_input_downsampling_gives_back_the_upsampled_original"],
    ),
    Mutation(
        id="teacher-input-gray-by-luma",
        feature="a grayscale teacher gets colour batches converted as PIL's convert('L') (ITU-R 601-2 luma)",
        file="distill/teacher/frozen.py",
        pattern="x = (x * luma[:, : x.shape[1]]).sum(1, keepdim=True)",
        replacement="x = x.mean(1, keepdim=True)",
        tests=["tests/test_student.py::test_teacher_input_grayscale_is_pils_convert_L"],
    ),
    Mutation(
        id="ensemble-mean-probs",
        feature="an ensemble's mean_probs combination is the log of the members' mean probability",
        file="distill/teacher/ensemble.py",
        pattern="return torch.logsumexp(stacked.log_softmax(-1), dim=0) - torch.log(torch.tensor(float(len(logits))))",
        replacement="return stacked.log_softmax(-1).mean(0)",
        tests=["tests/test_teacher_ensemble.py::test_combine_rules"],
    ),
    # ------------------------------------------------------------------------ the split check
    Mutation(
        id="split-leakage-refused",
        feature="a student validating on images its teacher trained on (another split) is refused",
        file="distill/student/module.py",
        pattern='if theirs.get("val") != ours["val"]:',
        replacement="if False:",
        tests=["tests/test_student.py::test_student_on_another_split_of_the_teachers_data_is_refused"],
    ),
    # ------------------------------------------------------------------------- optimizer, data
    Mutation(
        id="no-weight-decay-on-norms-and-tokens",
        feature="AdamW skips weight decay on norms, biases, position embedding and tokens",
        file="distill/training/optim.py",
        pattern="            groups += param_groups_weight_decay(m, weight_decay, no_weight_decay_list=skip)",
        replacement="            groups += [{\"params\": [p for p in m.parameters() if p.requires_grad], \"weight_decay\": weight_decay}]",
        tests=["tests/test_student.py::test_optimizer_holds_only_student_params_with_deit_weight_decay"],
    ),
    Mutation(
        id="lr-scaled-by-global-batch",
        feature="lr_reference_batch scales the lr by global batch / reference batch (DeiT)",
        file="distill/training/optim.py",
        pattern="effective = lr * batch / reference_batch",
        replacement="effective = lr * reference_batch / batch",
        tests=["tests/test_optim.py::test_lr_scaled_by_the_global_batch"],
    ),
    Mutation(
        id="repeated-aug-epoch-length",
        feature="DeiT's repeated-augmentation sampler draws DeiT's epoch length per rank",
        file="distill/data/samplers.py",
        pattern="return iter(mine[: self.num_selected])",
        replacement="return iter(mine)",
        tests=["tests/test_samplers.py::test_epoch_length_per_rank_is_deits",
               "tests/test_samplers.py::test_same_indices_as_deits_rasampler_at_seed_zero"],
    ),
    Mutation(
        id="eval-resize-by-crop-pct",
        feature="evaluation resizes the shorter side to floor(img_size / crop_pct), then centre-crops (DeiT)",
        file="distill/data/transforms.py",
        pattern="return transforms_imagenet_eval(img_size=size, crop_pct=check_crop_pct(crop_pct),",
        replacement="return transforms_imagenet_eval(img_size=size, crop_pct=1.0,",
        tests=["tests/test_transforms.py::test_crop_pct_and_bicubic_equal_deits_eval_transform"],
    ),
    Mutation(
        id="train-resize-by-crop-pct",
        feature="training without random-resized crops sees the evaluation's geometry, crop_pct included",
        file="distill/data/transforms.py",
        pattern="T.Resize(math.floor(size / check_crop_pct(crop_pct))",
        replacement="T.Resize(size",
        tests=["tests/test_transforms.py::test_training_without_rrc_resizes_and_crops_as_evaluation_does"],
    ),
    Mutation(
        id="feature-guidance-mse",
        feature="feature guidance is the MSE between projected student maps and the teacher's, summed over pairs",
        file="distill/student/feature_guidance.py",
        pattern="total = total + F.mse_loss(s, t)",
        replacement="total = total + F.l1_loss(s, t)",
        tests=["tests/test_feature_guidance.py::test_guidance_loss_is_the_authors_formula"],
    ),
    Mutation(
        id="teacher-records-its-split",
        feature="a step-1 checkpoint records which images its validation held out (for the split check)",
        file="distill/teacher/module.py",
        pattern='hp["data_split"] = dict(dm.split_fingerprint, seed=dm.hparams.seed,',
        replacement='hp["data_split"] = dict(',
        tests=["tests/test_student.py::test_student_on_another_split_of_the_teachers_data_is_refused"],
    ),
    Mutation(
        id="digits-split-fingerprint-is-the-val-set",
        feature="the split fingerprint of digits follows the held-out images",
        file="distill/data/datamodule.py",
        pattern='val=_sha(*sorted(keys[i] for i in d["val"]))',
        replacement="val=_sha(*sorted(keys))",
        tests=["tests/test_data.py::test_split_fingerprint_follows_the_digits_split",
               "tests/test_student.py::test_student_on_another_split_of_the_teachers_data_is_refused"],
    ),
    Mutation(
        id="teacher-records-its-interpolation",
        feature="a step-1 checkpoint records the interpolation its images were resized with",
        file="distill/teacher/module.py",
        pattern='input_interpolation=dm.eval_spec["interpolation"])',
        replacement="input_interpolation=None)",
        tests=["tests/test_student.py::test_teacher_at_its_own_resolution_sees_its_step1_input"],
    ),
    Mutation(
        id="frozen-backbone-epochs",
        feature="frozen_backbone_epochs trains only the heads for exactly that many first epochs",
        file="distill/training/finetune.py",
        pattern="trainer.current_epoch < self.epochs",
        replacement="trainer.current_epoch <= self.epochs",
        tests=["tests/test_pretrained.py::test_frozen_backbone_trains_the_heads_first_then_everything_and_resumes"],
    ),
    Mutation(
        id="non-finite-loss-guard-sees-nan",
        feature="a NaN (not only an infinite) training loss stops the run before a checkpoint is written",
        file="distill/training/fault_tolerance.py",
        pattern="bad = ~torch.isfinite(loss.detach()).all()",
        replacement="bad = torch.isinf(loss.detach()).any()",
        tests=["tests/test_faults.py::test_non_finite_loss_stops_with_one_line_and_keeps_last_good_checkpoint"],
    ),
    Mutation(
        id="warmup-linear-ramp",
        feature="linear warm-up from warmup_start_ratio x lr to lr",
        file="distill/training/optim.py",
        pattern="return warmup_start_ratio + (1.0 - warmup_start_ratio) * (step + 1) / (warmup_steps + 1)",
        replacement="return (step + 1) / (warmup_steps + 1)",
        tests=["tests/test_optim.py::test_warmup_start_and_cooldown"],
    ),
    Mutation(
        id="cosine-ends-at-min-lr",
        feature="the cosine decays to min_lr_ratio x lr (and the cool-down stays there)",
        file="distill/training/optim.py",
        pattern="return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))",
        replacement="return 0.5 * (1.0 + math.cos(math.pi * progress))",
        tests=["tests/test_optim.py::test_warmup_start_and_cooldown"],
    ),
    Mutation(
        id="label-smoothing-of-the-ce",
        feature="label_smoothing smooths the ground-truth CE",
        file="distill/losses.py",
        pattern="ce = F.cross_entropy(logits, target, ignore_index=UNLABELED, label_smoothing=label_smoothing)",
        replacement="ce = F.cross_entropy(logits, target, ignore_index=UNLABELED)",
        tests=["tests/test_losses.py::test_fixed_value_label_smoothing"],
    ),
    Mutation(
        id="dkd-warmup-factor",
        feature="DKD's warm-up weighs the term (epoch + 1) / dkd_warmup_epochs, as mdistiller",
        file="distill/losses.py",
        pattern="return min((self._epoch + 1.0) / self.dkd_warmup_epochs, 1.0)",
        replacement="return min(self._epoch / self.dkd_warmup_epochs, 1.0)",
        tests=["tests/test_losses.py::test_dkd_warmup_ramps_the_distillation_weight"],
    ),
    Mutation(
        id="teacher-takes-no-gradients",
        feature="the frozen teacher's parameters take no gradients (nor optimizer state)",
        file="distill/teacher/frozen.py",
        pattern="        network.requires_grad_(False)",
        replacement="        pass",
        tests=["tests/test_student.py::test_teacher_frozen_through_fit_and_validate"],
    ),
    Mutation(
        id="export-checks-the-reloaded-logits",
        feature="an hf export whose timm reload gives other logits is refused and leaves nothing written",
        file="distill/sharing/hf_export.py",
        pattern="if diff > MAX_LOGIT_DIFF or (tdiff is not None and tdiff > 1e-6):",
        replacement="if tdiff is not None and tdiff > 1e-6:",
        tests=["tests/test_hub.py::test_export_writes_nothing_when_refused_or_when_the_check_fails"],
    ),
    Mutation(
        id="fsdp-leaves-the-teacher-unsharded",
        feature="under FSDP the frozen teacher goes to ignored_modules (never flattened with the student)",
        file="distill/student/module.py",
        pattern='strategy.kwargs["ignored_modules"] = [*ignored, self.teacher]',
        replacement='strategy.kwargs["ignored_modules"] = ignored',
        tests=["tests/test_student.py::test_fsdp_strategy_ignores_the_teacher_and_keeps_the_students_parameters"],
    ),
]
