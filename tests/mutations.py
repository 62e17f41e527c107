"""Deliberate bugs the test suite must catch: a mutation check of our own.

Each ``Mutation`` is one small edit to one source file (``old`` -> ``new``, ``old`` occurring exactly once) and
the tests that must fail with it. ``python tests/mutations.py`` copies the repository's files into scratch
folders (one per job), applies the mutations one at a time, runs each one's tests there, and prints every
mutation the tests did not catch (a *survivor*). It exits with status 1 if any survived or could not run.

    python tests/mutations.py                 # all of them, 2 jobs
    python tests/mutations.py -k loss -k ema  # those whose name contains 'loss' or 'ema'
    python tests/mutations.py --list

``tests/test_mutations.py`` (in the normal suite) checks that every ``old`` text still occurs exactly once, so the
list cannot go stale silently, and runs the check end to end on one caught and one harmless edit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str                 # Relative to the repository root.
    old: str                  # Text that must occur exactly once in the file.
    new: str
    tests: tuple[str, ...]    # pytest node ids or files; at least one test among them must fail.


def _m(name: str, path: str, old: str, new: str, *tests: str) -> Mutation:
    return Mutation(name, path, old, new, tuple(tests))


LOSS, AUG, DATA = "training/loss.py", "training/data/augment.py", "training/data/dataset.py"
LOOP, STEP, SCHEDULES, SETUP = ("training/loop/training_loop.py", "training/loop/step.py", "training/loop/schedules.py",
                                "training/loop/setup.py")
PAPER, TIME_STEPS, NOISE_SCHEDULES = ("training/sampling/paper.py", "training/sampling/time_steps.py",
                                      "training/sampling/noise_schedules.py")
SEEDS, GUIDANCE = "training/sampling/seeds.py", "training/sampling/guidance.py"
REGISTRY = "training/sampling/registry.py"
SOLVERS, GAUSSIAN = "training/sampling/solvers.py", "training/sampling/gaussian.py"
GEN, IMAGES, CKPT = "training/sampling/generation.py", "training/images.py", "training/checkpoint.py"
UNETS, PRECOND, RUN_FILES = "training/networks/unets.py", "training/networks/precond.py", "training/run_files.py"
PHEMA = "training/ema/phema.py"
FRECHET, INCEPTION = "metrics/frechet.py", "metrics/inception.py"
DINOV2, EVALUATE, REFERENCE = "metrics/dinov2.py", "metrics/evaluate.py", "metrics/reference.py"
DINOV2_TESTS = "tests/test_dinov2.py"
ENCODERS, LATENTS, LATENT_TESTS = "training/data/encoders.py", "training/data/latents.py", "tests/test_latents.py"

# The training-loop tests that run in seconds (not the multi-process ones), and the loss-scaling test of test_perf.
LOOP_TESTS = tuple(f"tests/test_training_loop.py::test_{name}" for name in (
    "learning_rate_ramps_linearly_then_stays", "ema_beta_has_the_requested_half_life_in_images",
    "nonfinite_gradients_are_counted_and_replaced", "gradient_clean_up_matches_nan_to_num_per_tensor",
    "file_labels_are_whole_kimg_as_officially_else_unique_per_image_count",
    "resumed_run_reaches_the_same_weights_bit_exactly", "gradient_accumulation_matches_one_full_batch",
    "sigterm_saves_a_state_and_stops_cleanly", "time_limit_ends_the_run_with_a_final_snapshot",
    "each_step_ramps_the_learning_rate_and_moves_the_ema_by_the_formulas",
    "transfer_copies_the_snapshot_values_and_names_what_it_kept"))
LOSS_SCALING_TEST = "tests/test_perf.py::test_loss_scaling_multiplies_the_loops_gradients"
SAVED_RESUME_TEST = "tests/test_saved_runs.py::test_saved_training_state_resumes_to_the_uninterrupted_runs_weights"

MUTATIONS: tuple[Mutation, ...] = (
    # --- The bugs issue 17 found unnoticed.
    _m("loss: noise std sigma^2 instead of sigma", LOSS,
       "n = torch.randn_like(y) * sigma\n        D_yn", "n = torch.randn_like(y) * sigma ** 2\n        D_yn",
       "tests/test_loss.py"),
    _m("loss: VE weight 1/sigma instead of 1/sigma^2", LOSS,
       "torch.rand(shape, device=device)\n\n    def weight(self, sigma):\n        return 1 / sigma ** 2",
       "torch.rand(shape, device=device)\n\n    def weight(self, sigma):\n        return 1 / sigma",
       "tests/test_loss.py"),
    _m("unets: NCSN++ residual encoder without / sqrt(2)", UNETS,
       'x = (x + self.enc[f"{name}_aux_residual"](image)) / np.sqrt(2)',
       'x = (x + self.enc[f"{name}_aux_residual"](image))', "tests/test_networks.py"),
    _m("dataset: image cache keyed by position instead of raw index", DATA,
       "self._cached_images[raw_idx] = image", "self._cached_images[len(self._cached_images)] = image",
       "tests/test_dataset.py"),
    _m("loop: EMA never updated", STEP,
       "    update_ema(state.ema, state.net, ema_beta(",
       "    (lambda *args: None)(state.ema, state.net, ema_beta(", *LOOP_TESTS),
    _m("loop: SIGTERM handler not restored", LOOP,
       "            signal.signal(signal.SIGTERM, self._previous)",
       "            signal.signal(signal.SIGTERM, signal.SIG_DFL)", *LOOP_TESTS),
    # --- Losses.
    _m("loss: EDM weight without sigma_data^2 in the numerator", LOSS,
       "return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2",
       "return sigma ** 2 / (sigma * self.sigma_data) ** 2", "tests/test_loss.py"),
    _m("loss: EDM ln(sigma) drawn with P_std and P_mean swapped", LOSS,
       "torch.randn(shape, device=device) * self.P_std + self.P_mean",
       "torch.randn(shape, device=device) * self.P_mean + self.P_std", "tests/test_loss.py"),
    _m("loss: VP t drawn from U(0, 1) instead of U(epsilon_t, 1)", LOSS,
       "t = 1 + torch.rand(shape, device=device) * (self.epsilon_t - 1)",
       "t = 1 - torch.rand(shape, device=device)", "tests/test_loss.py"),
    _m("loss: augmentation labels not passed to the network", LOSS,
       "D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)",
       "D_yn = net(y + n, sigma, labels, augment_labels=None)", "tests/test_loss.py"),
    # --- The training loop and the EMA.
    _m("loop: learning rate not ramped up", SCHEDULES,
       "lr = base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)", "lr = base_lr",
       *LOOP_TESTS),
    _m("EMA: half-life ramp-up ignored", SCHEDULES,
       "halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)", "halflife_nimg = halflife_nimg",
       *LOOP_TESTS),
    _m("EMA: beta from the half-life in kimg instead of images", SCHEDULES,
       "return 0.5 ** (batch_size / max(ema_halflife_nimg(cur_nimg, ema_halflife_kimg, ema_rampup_ratio), 1e-8))",
       "return 0.5 ** (batch_size / max(ema_halflife_nimg(cur_nimg, ema_halflife_kimg, ema_rampup_ratio) / 1000, "
       "1e-8))",
       *LOOP_TESTS),
    _m("EMA: lerp towards the EMA instead of the network", STEP,
       "torch._foreach_lerp(net_params, ema_params, beta)", "torch._foreach_lerp(ema_params, net_params, beta)",
       *LOOP_TESTS),
    _m("loop: gradients not divided by the per-rank batch", STEP,
       "loss.sum().mul(run.config.loss_scaling / per_rank).backward()",
       "loss.sum().mul(run.config.loss_scaling).backward()",
       *LOOP_TESTS, LOSS_SCALING_TEST),
    _m("loop: loss scaling not applied", STEP,
       "loss.sum().mul(run.config.loss_scaling / per_rank).backward()", "loss.sum().mul(1 / per_rank).backward()",
       LOSS_SCALING_TEST),
    _m("loop: NaN gradients kept", STEP,
       "torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)", "pass", *LOOP_TESTS),
    _m("loop: a resumed run ends its first tick after one step", LOOP,
       "first=state.cur_tick == 0", "first=True", *LOOP_TESTS),
    _m("state: a resume leaves Adam's moments fresh", "training/loop/state.py",
       'self.optimizer.load_state_dict(data["optimizer_state"])', "pass", SAVED_RESUME_TEST),
    _m("state: a resume leaves the RNG states unrestored", "training/loop/state.py",
       "restore_rng_state(states[dist.get_rank()], device)", "pass", SAVED_RESUME_TEST),
    _m("state: fractional kimg names collide", RUN_FILES,
       'return f"{whole:06d}" if rest == 0 else f"{whole:06d}.{rest:03d}"', 'return f"{whole:06d}"',
       *LOOP_TESTS),
    # --- Augmentation.
    _m("augment: rotation matrix turns the other way", AUG,
       "return _stack_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)",
       "return _stack_matrix([[c, s, 0], [-s, c, 0], [0, 0, 1]], theta)", "tests/test_augment.py"),
    _m("augment: yflip label entry before xflip", AUG,
       '_PIXEL_BLITS = {"xflip": (1, _xflip), "yflip": (1, _yflip),',
       '_PIXEL_BLITS = {"yflip": (1, _yflip), "xflip": (1, _xflip),', "tests/test_augment.py"),
    _m("augment: lumaflip projects instead of reflecting", AUG,
       "torch.eye(4, device=draws.device) - 2 * torch.outer(luma, luma)",
       "torch.eye(4, device=draws.device) - torch.outer(luma, luma)", "tests/test_augment.py"),
    _m("augment: saturation scales the luma instead of the chroma", AUG,
       "return along + across * torch.exp2(", "return across + along * torch.exp2(", "tests/test_augment.py"),
    _m("augment: hue rotates the other way", AUG,
       "return rotate3d(_luma_axis(draws.device), angle)", "return rotate3d(_luma_axis(draws.device), -angle)",
       "tests/test_augment.py"),
    _m("augment: contrast 2^(std w) becomes e^(std w)", AUG,
       "return scale3d(torch.exp2(w * pipe.contrast_std)), [w]",
       "return scale3d(torch.exp(w * pipe.contrast_std)), [w]",
       "tests/test_augment.py"),
    _m("augment: grayscale color sums the channels instead of averaging", AUG,
       "mean_row = M[:, :3, :].mean(dim=1, keepdim=True)", "mean_row = M[:, :3, :].sum(dim=1, keepdim=True)",
       "tests/test_augment.py"),
    _m("augment: fractional translation label sign flipped", AUG,
       "[t[0], t[1]]\n", "[-t[0], -t[1]]\n", "tests/test_augment.py"),
    _m("augment: quarter turns become a transpose (a mirror) without the x flip", AUG,
       "flip_x = flip_y ^ transpose", "flip_x = flip_y", "tests/test_augment.py"),
    # --- Datasets.
    _m("dataset: mirrored items not mirrored", DATA,
       "pixels = image[:, :, ::-1] if mirrored else image", "pixels = image", "tests/test_dataset.py"),
    _m("dataset: mirrored along the wrong axis", DATA,
       "pixels = image[:, :, ::-1] if mirrored else image", "pixels = image[:, ::-1, :] if mirrored else image",
       "tests/test_dataset.py"),
    _m("dataset: max_size subset ignores the seed", DATA,
       "kept_raw_indices(num_images, max_size, random_seed)", "kept_raw_indices(num_images, max_size, 0)",
       "tests/test_dataset.py"),
    # --- Samplers.
    _m("sampler: Heun averages with weights 1 and 0", PAPER,
       "return x + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * d_prime)", "return x + h * d_prime",
       "tests/test_sampling.py"),
    _m("sampler: Eq. 5 with rho and 1/rho swapped", TIME_STEPS,
       "max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)",
       "max_inv_rho, min_inv_rho = sigma_max ** rho, sigma_min ** rho", "tests/test_sampling.py"),
    _m("sampler: churn gamma not capped at sqrt(2) - 1", PAPER,
       "return min(self.S_churn / num_steps, np.sqrt(2) - 1) if", "return self.S_churn / num_steps if",
       "tests/test_sampling.py"),
    _m("sampler: churn ignores S_noise", PAPER,
       "added_std * flow.s(t_hat) * self.S_noise * noise", "added_std * flow.s(t_hat) * noise",
       "tests/test_sampling.py"),
    _m("sampler: balanced classes skip the random label draw", SEEDS,
       "labels = torch.eye(label_dim, device=rng.device)[rng.randint(label_dim, size=[len(rng.generators)])]",
       "labels = None if class_idx == BALANCED else torch.eye(label_dim, device=rng.device)[rng.randint(label_dim, "
       "size=[len(rng.generators)])]", "tests/test_sampling.py"),
    _m("sampler: balanced classes by position instead of seed", SEEDS,
       "[[seed % label_dim for seed in rng.seeds]]",
       "[[i % label_dim for i in range(len(rng.seeds))]]", "tests/test_sampling.py"),
    _m("sampler: last step Heun instead of Euler", PAPER,
       "x = (step if i < num_steps - 1 else euler_step)(dx_dt, x_hat, t_hat, t_next)",
       "x = step(dx_dt, x_hat, t_hat, t_next)", "tests/test_sampling.py"),
    _m("sampler: VP scaling derivative sign", NOISE_SCHEDULES,
       "return -schedule.sigma(t) * schedule.sigma_deriv(t) * (s(t) ** 3)",
       "return schedule.sigma(t) * schedule.sigma_deriv(t) * (s(t) ** 3)", "tests/test_sampling.py"),
    _m("sampler: VE steps arithmetic in t instead of geometric", TIME_STEPS,
       "t = sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** _ramp(num_steps, device)",
       "t = sigma_max ** 2 + (sigma_min ** 2 - sigma_max ** 2) * _ramp(num_steps, device)",
       "tests/test_sampling.py"),
    # --- EDM2: loss, learning rate, power-function EMAs, label dropout.
    _m("EDM2 loss: the uncertainty term u(sigma) dropped", LOSS,
       "return self.weight(sigma) / logvar.exp() * ((D_yn - y) ** 2) + logvar",
       "return self.weight(sigma) / logvar.exp() * ((D_yn - y) ** 2)", "tests/test_edm2_loss.py"),
    _m("EDM2 lr: decay 1/t instead of 1/sqrt(t)", SCHEDULES,
       "lr /= max(cur_nimg / (batch_size * ref_batches), 1) ** 0.5",
       "lr /= max(cur_nimg / (batch_size * ref_batches), 1)", "tests/test_edm2_training.py"),
    _m("lr cooldown: over the whole run instead of its last fraction", SCHEDULES,
       "return min(max((total_nimg - cur_nimg) / (fraction * total_nimg), 0.0), 1.0)",
       "return min(max((total_nimg - cur_nimg) / total_nimg, 0.0), 1.0)", "tests/test_edm2_training.py"),
    _m("lr cooldown: train.py drops --lr-cooldown", "train.py",
       "        c.lr_cooldown = opts.lr_cooldown\n", "        pass\n",
       "tests/test_edm2_training.py::test_a_run_with_a_cooldown_reports_the_cooled_rate"),
    _m("lr cooldown: the loop's rate ignores it", STEP,
       "config.batch_size, config.lr_decay_batches, config.total_nimg,\n"
       "                                    config.lr_cooldown)",
       "config.batch_size, config.lr_decay_batches)",
       "tests/test_edm2_training.py::test_a_run_with_a_cooldown_reports_the_cooled_rate"),
    _m("post-hoc EMA: beta exponent gamma instead of gamma + 1", PHEMA,
       "return (1 - t_delta / t_next) ** (sigma_rel_to_gamma(sigma_rel) + 1)",
       "return (1 - t_delta / t_next) ** sigma_rel_to_gamma(sigma_rel)", "tests/test_edm2_training.py"),
    _m("post-hoc EMA: coefficients not normalised to sum 1", PHEMA,
       "return weights / weights.sum(axis=0, keepdims=True)", "return weights", "tests/test_phema.py"),
    _m("label dropout: keeps the labels it should drop", STEP,
       "keep = torch.rand([labels.shape[0], 1], device=labels.device) >= probability",
       "keep = torch.rand([labels.shape[0], 1], device=labels.device) < probability",
       "tests/test_edm2_training.py"),
    _m("EDM2 resampling kernel: an inference tensor when first made under inference mode",
       "training/networks/edm2.py", "with torch.inference_mode(False), torch.no_grad():", "with torch.no_grad():",
       "tests/test_edm2_network.py::test_resampling_kernel_is_made_once_per_device_and_serves_training_after_inference"),
    _m("EDM2 patches: the output's channels put back transposed", "training/networks/edm2.py",
       "return F.pixel_shuffle(x, self.patch_size) if self.patch_size > 1 else x",
       "return F.pixel_shuffle(x, self.patch_size).transpose(2, 3) if self.patch_size > 1 else x",
       "tests/test_edm2_network.py::test_patches_are_space_to_depth_around_the_same_unet"),
    _m("phema --outkimg: a KKKKKKK with several snapshots in its thousand takes the first", RUN_FILES,
       "return within[0] if len(within) == 1 else None", "return within[0] if within else None",
       "tests/test_phema.py::test_outkimg_names_official_and_fractional_snapshot_times"),
    _m("EDM2 box resampling: max instead of average pooling", "training/networks/edm2.py",
       'return F.avg_pool2d(x, 2) if mode == "down"', 'return F.max_pool2d(x, 2) if mode == "down"',
       "tests/test_edm2_network.py::test_resampling_is_a_2x2_box_filter",
       "tests/test_edm2_network.py::test_box_resampling_equals_the_filters_convolution"),
    _m("EDM2 clipping: a value at the limit keeps its gradient (clamp_ gives it 0)", "training/networks/edm2.py",
       "x.abs().amax().item() < limit:", "x.abs().amax().item() <= limit:",
       "tests/test_edm2_network.py::test_clipping_gives_clamps_values_and_gradient"),
    _m("EDM2 clipping: skipped on the CPU whatever the values", "training/networks/edm2.py",
       "x.abs().amax().item() < limit:", "True:", "tests/test_edm2_network.py::test_activations_are_clipped",
       "tests/test_edm2_network.py::test_clipping_gives_clamps_values_and_gradient"),
    _m("CPU defaults: channels_last off for EDM2 too", "training/perf.py",
       "channels_last=_is_edm2(network)", "channels_last=False",
       "tests/test_perf.py::test_variants_parse_and_name_their_errors",
       "tests/test_perf.py::test_sampling_on_the_cpu_takes_the_networks_memory_format_default"),
    _m("CPU defaults: sampling does not pass its network", GEN,
       "fast = default_fast_paths(device, net).with_options(**options.fast_paths)",
       "fast = default_fast_paths(device).with_options(**options.fast_paths)",
       "tests/test_perf.py::test_sampling_on_the_cpu_takes_the_networks_memory_format_default"),
    _m("CPU defaults: the training loop does not pass its network", SETUP,
       "fast = default_fast_paths(device, net).with_options(**(config.fast_paths or {}))",
       "fast = default_fast_paths(device).with_options(**(config.fast_paths or {}))",
       "tests/test_edm2_training.py::test_edm2_run_writes_one_snapshot_per_sigma_rel_and_resumes_bit_exactly"),
    # --- Guidance.
    _m("guidance: guide and network swapped in the lerp", GUIDANCE,
       "return D_g.to(D.dtype).lerp(D, self.weight)", "return D.lerp(D_g.to(D.dtype), self.weight)",
       "tests/test_guidance.py"),
    _m("guidance: an unconditional guide handed the labels", GUIDANCE,
       'guide_labels = class_labels if getattr(self.guide, "label_dim", 0) else None',
       "guide_labels = class_labels",
       "tests/test_guidance.py::test_an_unconditional_guide_is_called_without_labels"),
    _m("generation: an unconditional guide refused", GEN,
       "if guide_classes and guide_classes != classes:", "if guide_classes != classes:",
       "tests/test_guidance.py::test_generate_cli_writes_the_guided_images"),
    _m("guidance: the interval ignored", GUIDANCE,
       "        if self.interval is None:\n            return True", "        if True:\n            return True",
       "tests/test_guidance.py"),
    _m("guidance: w = 1 still calls the guide", GUIDANCE,
       "        if self.weight == 1:\n            return False", "        if False:\n            return False",
       "tests/test_guidance.py"),
    _m("guidance: classifier-free guide keeps the labels", GUIDANCE,
       "torch.cat([labels, torch.zeros_like(labels)])", "torch.cat([labels, labels])", "tests/test_guidance.py"),
    # --- Networks and preconditioning.
    _m("precond: VE c_noise log(sigma) instead of log(sigma / 2)", PRECOND,
       "c_noise = (0.5 * sigma).log()", "c_noise = sigma.log()", "tests/test_precond.py"),
    # --- Metrics.
    _m("FID: trace term without the factor 2", FRECHET,
       "- 2 * np.sum(np.sqrt(inner))", "- np.sum(np.sqrt(inner))", "tests/test_frechet.py"),
    _m("FID: biased covariance", FRECHET,
       "sigma = centered.T @ centered / (features.shape[0] - 1)", "sigma = centered.T @ centered / features.shape[0]",
       "tests/test_frechet.py"),
    _m("Inception: inputs scaled to [0, 2] instead of [-1, 1]", INCEPTION,
       "return (resize_tf1_bilinear(x) - 128) / 128", "return resize_tf1_bilinear(x) / 128",
       "tests/test_inception.py"),
    _m("FD-DINOv2: the ImageNet mean and std swapped", DINOV2,
       "return (x / 255 - mean) / std", "return (x / 255 - std) / mean",
       f"{DINOV2_TESTS}::test_preprocessing_is_antialiased_bicubic_to_224_then_imagenet_normalized"),
    _m("FD-DINOv2: bicubic resize without antialiasing", DINOV2,
       'mode="bicubic", antialias=True)', 'mode="bicubic", antialias=False)',
       f"{DINOV2_TESTS}::test_preprocessing_is_antialiased_bicubic_to_224_then_imagenet_normalized"),
    _m("FD-DINOv2: a patch token instead of the class token", DINOV2,
       "return tokens[:, 0].to(torch.float32)", "return tokens[:, 1].to(torch.float32)",
       f"{DINOV2_TESTS}::test_features_are_the_class_token_of_dinov2s_vit"),
    _m("FD-DINOv2: position grid resized without DINOv2's offset", DINOV2,
       "scale = (grid_size + POS_EMBED_OFFSET) / m", "scale = grid_size / m",
       f"{DINOV2_TESTS}::test_position_embedding_is_dinov2s_run_time_interpolation",
       f"{DINOV2_TESTS}::test_features_are_the_class_token_of_dinov2s_vit"),
    _m("FD-DINOv2: compares the Inception's features", EVALUATE,
       '"fd_dinov2": "dinov2"}', '"fd_dinov2": "inception"}',
       "tests/test_frechet.py::test_each_frechet_metric_compares_its_own_detectors_statistics"),
    _m("FD-DINOv2: cached statistics not keyed by their detector", EVALUATE,
       "reference_cache_path(data_path, *detector_settings(detector), *settings,",
       "reference_cache_path(data_path, *settings,",
       f"{DINOV2_TESTS}::test_cached_dataset_statistics_are_keyed_by_detector_and_computed_in_one_pass"),
    _m("references: EDM2's pickles unpickled with any global", REFERENCE,
       "        allowed = _numpy_array_globals()\n",
       "        return pickle.Unpickler.find_class(self, module, name)\n",
       f"{DINOV2_TESTS}::test_a_pickle_that_names_other_globals_is_refused_and_nothing_runs"),
    # --- Multistep solvers on unequal steps.
    _m("DPM-Solver++(2M): the step ratio r inverted", "training/sampling/solvers.py",
       "r = (log_sigma(sigma) - log_sigma(levels[i - 1])) / h", "r = h / (log_sigma(sigma) - log_sigma(levels[i - 1]))",
       "tests/test_samplers.py::test_dpmpp_2m_is_its_update_formula_on_unequal_steps"),
    _m("named samplers: --rho not passed to the EDM levels", "training/sampling/registry.py",
       "sigmas = sigma_steps(time_steps, num_levels, sigma_min, sigma_max, rho)",
       "sigmas = sigma_steps(time_steps, num_levels, sigma_min, sigma_max, 7)",
       "tests/test_samplers.py::test_rho_reaches_the_named_samplers_edm_levels"),
    _m("the paper's samplers through the registry lose their churn", "training/sampling/registry.py",
       "return self.solver(denoise, x, sigmas, randn_like, callback, churn=churn,",
       "return self.solver(denoise, x, sigmas, randn_like, callback, churn=Churn(),",
       "tests/test_samplers.py::test_registry_heun_and_euler_are_the_papers"),
    _m("the paper's Heun as a solver ends without its Euler step", "training/sampling/paper.py",
       "x = (step if i < num_steps - 1 else euler_step)(dx_dt, x_hat, t_hat, t_next)",
       "x = step(dx_dt, x_hat, t_hat, t_next) if float(t_next) > 0 else x_hat",
       "tests/test_samplers.py::test_every_registry_entrys_solver_runs_on_a_denoiser_and_levels"),
    _m("fid.py calc --repeats: the seed sets overlap", "fid.py",
       "    shift = max(seeds) + 1\n", "    shift = 1\n",
       "tests/test_fid.py::test_repeats_measure_disjoint_seed_sets_and_report_min_mean_and_spread"),
    # --- plot_run.py: the dashboard shows the truth.
    _m("plot_run: the loss on a log axis whatever its sign", "plot_run.py",
       'ylabel="loss",\n           yscale=value_scale(plotted_y(ax))', 'ylabel="loss",\n           yscale="log"',
       "tests/test_plot_run.py::test_a_loss_below_zero_is_on_a_linear_axis_that_holds_it"),
    _m("plot_run: loss by sigma scaled by the untrained tick 0", "plot_run.py",
       "ticks = trained_ticks([s for s", "ticks = ([s for s",
       "tests/test_plot_run.py::test_loss_by_sigma_leaves_out_tick_0_when_later_ticks_exist"),
    _m("plot_run: a short run's loss smoothed over 10 ticks", "plot_run.py",
       "return max(1, min(most, num_ticks // 10))", "return most",
       "tests/test_plot_run.py::test_the_smoothed_loss_of_a_short_run_is_its_loss_and_a_long_run_is_averaged_over_10_ticks"),
    _m("plot_run: the loss curve starts at the untrained tick 0", "plot_run.py",
       'series(trained_ticks(run["stats"]), "Loss/loss")', 'series(run["stats"], "Loss/loss")',
       "tests/test_plot_run.py::test_the_smoothed_loss_of_a_short_run_is_its_loss_and_a_long_run_is_averaged_over_10_ticks"),
    _m("plot_run: every network's metric values on each network's line", "plot_run.py",
       'r["metric"] == metric and r["network"] == network and r["value"]', 'r["metric"] == metric and r["value"]',
       "tests/test_plot_run.py::test_metrics_panels_come_with_metrics_jsonl_a_line_per_network"),
    # --- Consistency tuning.
    _m("consistency: the gap t - r halves one stage late", "training/loss.py",
       "return (t * (1 - n / q ** (stage + 1))).clamp(min=0)", "return (t * (1 - n / q ** stage)).clamp(min=0)",
       "tests/test_consistency.py::test_r_of_t_is_ects_mapping"),
    _m("consistency: the loss not weighted by 1 / (t - r)", "training/loss.py",
       "        return distance / (t - r).flatten()", "        return distance",
       "tests/test_consistency.py::test_loss_is_the_weighted_distance_of_the_two_calls"),
    _m("consistency: fresh noise for the target", "training/loss.py",
       "x_r = (y + r * n) if self.teacher", "x_r = (y + r * torch.randn_like(n)) if self.teacher",
       "tests/test_consistency.py::test_loss_is_the_weighted_distance_of_the_two_calls"),
    _m("consistency: the two calls draw different dropout masks", "training/loss.py",
       "        with torch.random.fork_rng(devices=devices):  # The target then draws",
       "        with contextlib.nullcontext():  # The target then draws",
       "tests/test_consistency.py::test_the_target_gets_no_gradient_and_shares_the_dropout_masks"),
    _m("consistency: the training loop never moves the stage on", "training/loop/step.py",
       "        run.loss_fn.set_progress(run.state.cur_nimg)\n", "        pass\n",
       "tests/test_consistency.py::test_two_processes_tune_an_edm2_network_resume_bit_exactly_and_generate_py_samples_it"),
    _m("consistency: gradients flow through the target too", "training/loss.py",
       "with torch.no_grad(), weights_left_as_they_are(net):", "with weights_left_as_they_are(net):",
       "tests/test_consistency.py::test_the_target_gets_no_gradient_and_shares_the_dropout_masks"),
    _m("consistency sampler: re-noised to tau, not sqrt(tau^2 - sigma_min^2)", "training/sampling/solvers.py",
       "x = D + math.sqrt(levels[i] ** 2 - sigma_min ** 2) * randn_like(D)", "x = D + levels[i] * randn_like(D)",
       "tests/test_consistency.py::test_consistency_sampler_calls_f_once_per_level_and_renoises_between"),
    _m("train.py --consistency: EDM's p(t) instead of ECT's", "training/presets.py",
       "CONSISTENCY_DEFAULTS = dict(p_mean=-1.1, p_std=2.0,", "CONSISTENCY_DEFAULTS = dict(p_mean=-1.1,",
       "tests/test_consistency.py::test_consistency_options_are_checked"),
    # --- Latent diffusion.
    _m("latents: standardized with the raw std, not divided by it", ENCODERS,
       "self.scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)",
       "self.scale = np.float32(final_std) * np.asarray(raw_std, dtype=np.float32)",
       f"{LATENT_TESTS}::test_standardization_is_the_official_affine_map"),
    _m("latents: drawn with the std's noise missing", ENCODERS,
       "x = mean + torch.randn_like(mean) * std if sample else mean", "x = mean",
       f"{LATENT_TESTS}::test_standardization_is_the_official_affine_map"),
    _m("latents: decode skips undoing the standardization", ENCODERS,
       "        x = (x - self._per_channel(self.bias, x)) / self._per_channel(self.scale, x)\n", "",
       f"{LATENT_TESTS}::test_standardization_is_the_official_affine_map",
       f"{LATENT_TESTS}::test_generate_and_fid_decode_official_latent_pickles_with_and_without_guidance"),
    _m("latents: pixels fed to the VAE in [0, 255]", ENCODERS,
       "x = x.to(torch.float32) / 255\n", "x = x.to(torch.float32)\n",
       f"{LATENT_TESTS}::test_encode_writes_the_official_layout_of_raw_latents"),
    _m("latents: raw latents hold the mean twice, not mean and std", ENCODERS,
       "parts.append(torch.cat([distribution.mean, distribution.std], dim=1))",
       "parts.append(torch.cat([distribution.mean, distribution.mean], dim=1))",
       f"{LATENT_TESTS}::test_encode_writes_the_official_layout_of_raw_latents"),
    _m("latents: an uncached VAE is asked of an unreachable hub", ENCODERS,
       "            if offline is not None:\n", "            if offline is None and False:\n",
       f"{LATENT_TESTS}::test_a_hub_name_that_is_not_cached_is_one_line_at_once_when_the_hub_cannot_be_reached"),
    _m("latents: HF_HUB_OFFLINE read as unset", ENCODERS,
       'os.environ.get("HF_HUB_OFFLINE", "")', '""',
       f"{LATENT_TESTS}::test_a_hub_name_that_is_not_cached_is_one_line_at_once_when_the_hub_cannot_be_reached"),
    _m("latents: generate.py ignores the snapshot's encoder", GEN,
       "    return encoder.decode\n", "    return to_uint8\n",
       f"{LATENT_TESTS}::test_generate_and_fid_decode_official_latent_pickles_with_and_without_guidance"),
    _m("latents: fid.py calc --network measures undecoded samples", "fid.py",
       "sampler=sampler, decode=decode)", "sampler=sampler)",
       f"{LATENT_TESTS}::test_generate_and_fid_decode_official_latent_pickles_with_and_without_guidance"),
    _m("latents: the EMA sweep measures undecoded samples", "training/ema/sweep.py",
       'desc=f"sigma_rel {sigma_rel:.3f}", decode=decode)', 'desc=f"sigma_rel {sigma_rel:.3f}")',
       f"{LATENT_TESTS}::test_ema_sweep_and_in_training_metrics_decode_latent_runs"),
    _m("latents: the in-training metrics measure undecoded samples", "training/loop/monitor.py",
       "sampler=self.sampler, progress=False, decode=self.decode)",
       "sampler=self.sampler, progress=False)",
       f"{LATENT_TESTS}::test_ema_sweep_and_in_training_metrics_decode_latent_runs"),
    _m("latents: a latent dataset accepted as an FID reference", "training/data/dataset.py",
       "    if dataset.is_latent:\n        raise DatasetError", "    if False:\n        raise DatasetError",
       f"{LATENT_TESTS}::test_metrics_and_fid_references_refuse_latent_datasets"),
    _m("latents: a latent dataset mirrored", "training/data/dataset.py",
       "if self.is_latent and xflip:", "if False:",
       f"{LATENT_TESTS}::test_a_latent_dataset_is_never_mirrored"),
    _m("latents: official file names without the 5-digit folder", LATENTS,
       'return f"{index // 1000:05d}/img-mean-std-{index:08d}.npy"', 'return f"img-mean-std-{index:08d}.npy"',
       f"{LATENT_TESTS}::test_encode_writes_the_official_layout_of_raw_latents"),
    _m("latents: training feeds raw latents to the network", "training/loop/step.py",
       "run.encoder.encode_latents(", "(lambda x: x.to(torch.float32))(",
       f"{LATENT_TESTS}::test_latent_preset_trains_and_its_snapshot_holds_the_encoder"),
    _m("train.py: --metrics=fd_dinov2 accepted without timm", "train.py",
       "            require_timm()\n", "            pass\n",
       "tests/test_monitor.py::test_train_py_without_timm_refuses_fd_dinov2_in_one_line"),
    # --- Checkpoints.
    _m("checkpoint: the unpickler resolves any global", CKPT,
       "    def find_class(self, module: str, name: str) -> Any:\n",
       "    def find_class(self, module: str, name: str) -> Any:\n"
       "        return pickle.Unpickler.find_class(self, module, name)\n", "tests/test_checkpoint.py"),
    _m("checkpoint: storages unpickled without restriction", CKPT,
       '("torch.storage", "_load_from_bytes"): _load_storage_from_bytes',
       '("torch.storage", "_load_from_bytes"): torch.storage._load_from_bytes', "tests/test_checkpoint.py"),
    # --- Generation.
    _m("generation: class labels drawn before the latents", SEEDS,
       "return rng.randn([len(rng.generators), net.img_channels, net.img_resolution, net.img_resolution])",
       "rng.randint(2, size=[len(rng.generators)])\n"
       "    return rng.randn([len(rng.generators), net.img_channels, net.img_resolution, net.img_resolution])",
       "tests/test_sampling.py", "tests/test_generate.py"),
    _m("generation: one generator for the whole batch", SEEDS,
       "self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]",
       "self.generators = [torch.Generator(self.device).manual_seed(int(seeds[0]) % (1 << 32))] * len(seeds)",
       "tests/test_sampling.py", "tests/test_generate.py"),
    _m("generation: grid laid out column by column", IMAGES,
       "return padded.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)",
       "return padded.reshape(cols, rows, c, h, w).permute(2, 1, 3, 0, 4).reshape(c, rows * h, cols * w)",
       "tests/test_generate.py"),
    _m("generation: seeds split into too few batches under several processes", GEN,
       "num_batches = math.ceil(len(seeds) / (max_batch_size * world_size)) * world_size",
       "num_batches = math.ceil(len(seeds) / max_batch_size)", "tests/test_generate.py"),
    # --- Samplers by name (issue 20).
    _m("solvers: DPM-Solver++(2M) with 1/r instead of 1/(2r)", SOLVERS,
       "D = (1 + 1 / (2 * r)) * denoised[-1] - 1 / (2 * r) * denoised[-2]",
       "D = (1 + 1 / r) * denoised[-1] - 1 / r * denoised[-2]",
       "tests/test_samplers.py::test_empirical_order_is_at_least_nominal[dpmpp_2m]"),
    _m("solvers: UniPC without its corrector", SOLVERS,
       "        x = _unipc_update(x, denoised[-1], lambdas[i], lambdas[i + 1], history + [(lambdas[i + 1], D_t)], variant)",
       "        x = x_pred", "tests/test_samplers.py::test_empirical_order_is_at_least_nominal[unipc_bh2]"),
    _m("solvers: last step D(x; sigma_min) instead of the sigma^2 extrapolation", SOLVERS,
       "    weights = lagrange_basis(u, np.zeros(1))[:, 0].tolist()", "    weights = [0.0] * (points - 1) + [1.0]",
       "tests/test_samplers.py::test_final_step_extrapolates_in_sigma_squared"),
    _m("solvers: two-stage solvers overspend an even budget", SOLVERS,
       "return nfe if self.calls_per_step == 1 else (nfe + 1) // 2",
       "return nfe if self.calls_per_step == 1 else nfe // 2 + 1",
       "tests/test_samplers.py::test_nfe_bounds_the_network_calls"),
    _m("solvers: analytic first step scales by the inverse ratio", GAUSSIAN,
       "scale = torch.sqrt((self.eigvals + sigma_to ** 2) / (self.eigvals + sigma_from ** 2))",
       "scale = torch.sqrt((self.eigvals + sigma_from ** 2) / (self.eigvals + sigma_to ** 2))",
       "tests/test_samplers.py::test_gaussian_first_step_is_the_exact_ode_solution_for_gaussian_data"),
    _m("solvers: Gaussian covariance fitted as sigma^2 A instead of sigma^2 A (I - A)^-1", GAUSSIAN,
       "return GaussianData(mean, sigma ** 2 * a / (1 - a), eigvecs)", "return GaussianData(mean, sigma ** 2 * a, eigvecs)",
       "tests/test_samplers.py::test_gaussian_first_step_is_the_exact_ode_solution_for_gaussian_data"),
    _m("sampling: Gaussian fit left to the counted sampling", REGISTRY,
       "            self.gaussian_model(net, float(sigmas[0]), latents.device)\n", "            pass\n",
       "tests/test_samplers.py::test_gaussian_first_step_fits_once_on_its_own_noise_and_is_not_counted"),
    # --- The paper in miniature (issue 22).
    _m("paper: config D keeps the VP preconditioning", "benchmarks/paper/configs.py",
       '_D = dataclasses.replace(_C, title="+ Our preconditioning", precond="edm")',
       '_D = dataclasses.replace(_C, title="+ Our preconditioning", precond="vp")',
       "tests/test_paper.py::test_config_table_is_the_papers_table2_with_table7_hyperparameters"),
    _m("paper: the loss follows --precond (config D trains with EDM's loss)", "benchmarks/paper/pieces.py",
       'c.loss_kwargs = dnnlib.EasyDict(class_name=LOSS_CLASSES[options["loss"]])', "c.loss_kwargs = c.loss_kwargs",
       "tests/test_paper.py::test_training_arguments_build_each_configs_network_loss_and_schedule"),
    _m("paper: EMA half-life in kimg where train.py takes Mimg", "benchmarks/paper/configs.py",
       "ema=fraction_of_run(config.ema_mimg) * size.kimg / 1000", "ema=fraction_of_run(config.ema_mimg) * size.kimg",
       "tests/test_paper.py::test_miniature_options_keep_the_papers_differences_at_the_sizes_scale"),
    _m("paper: --kimg leaves the schedules at the size's own length", "benchmarks/paper/configs.py",
       'return dataclasses.replace(size, name=f"{size.name}-{kimg:g}kimg", kimg=kimg)',
       'return dataclasses.replace(size, name=f"{size.name}-{kimg:g}kimg")',
       "tests/test_paper.py::test_kimg_changes_only_the_training_length_and_the_schedules_keep_their_share"),
    _m("paper: Figure 2's error measured against the curve's own most steps", "benchmarks/paper/experiments.py",
       "fig2_sampler_kwargs(sampler, FIG2_CONVERGED_FACTOR * max(fig2_steps(ws, sampler)))",
       "fig2_sampler_kwargs(sampler, max(fig2_steps(ws, sampler)))",
       "tests/test_paper.py::test_smoke_fig2_error_is_the_images_distance_to_the_same_sampler_at_4x_its_most_steps"),
    _m("paper: the sampling error as a mean absolute difference", "benchmarks/paper/pieces.py",
       "rms = float(np.sqrt(np.mean((images.astype(np.float64) - converged) ** 2)) * 127.5)",
       "rms = float(np.mean(np.abs(images.astype(np.float64) - converged)) * 127.5)",
       "tests/test_paper.py::test_sampling_error_is_the_rms_difference_in_8_bit_levels_against_images_made_once"),
    # --- Cached features and the quickstart's time budget.
    _m("fid: calc --network ignores --precision", "fid.py",
       "options = GenerateOptions(network=network, seeds=seed_list, gnet=gnet, precision=precision,",
       "options = GenerateOptions(network=network, seeds=seed_list, gnet=gnet, precision=None,",
       "tests/test_fid.py::test_in_memory_network_evaluation_equals_generate_then_calc"),
    _m("fid: cached real-image features ignore which subset --num/--seed picked", "fid.py",
       'subset = [f"subset={len(dataset)},{seed}"]', "subset = []",
       "tests/test_fid.py::test_ref_and_real_images_are_read_from_the_cache_the_second_time"),
    _m("quickstart: the predicted evaluation leaves out the Inception passes", "quickstart.py",
       "return self.sampling(n, nfe, False) + n * self.inception + 2 * STARTUP_SECONDS",
       "return self.sampling(n, nfe, False) + 2 * STARTUP_SECONDS",
       "tests/test_quickstart.py::test_evaluation_prediction_and_training_minutes_follow_the_stages"),
    _m("quickstart: w = 1 is predicted with the guide's calls", "quickstart.py",
       "self.sampling(n, nfe, w != 1) + n * self.inception for w in weights",
       "self.sampling(n, nfe, True) + n * self.inception for w in weights",
       "tests/test_quickstart.py::test_evaluation_prediction_and_training_minutes_follow_the_stages"),
    _m("quickstart: --guidance drops w = 1", "quickstart.py",
       "weights = tuple(dnnlib.util.parse_float_list(value))",
       "weights = tuple(w for w in dnnlib.util.parse_float_list(value) if w != 1)",
       "tests/test_quickstart.py::test_guidance_weights_option_keeps_the_listed_weights_and_needs_a_guided_one"),
    _m("quickstart: the run after an earlier guide's snapshot starts over instead of resuming", "quickstart.py",
       '{**rest, "resume": "auto"}', "rest",
       "tests/test_quickstart.py::test_training_runs_share_the_budget_or_the_duration_with_the_guide"),
    _m("quickstart: a smaller guide trains for the main network's share", "quickstart.py",
       "part(guide_options, share), guide=True)", "part(guide_options, 1 - share), guide=True)",
       "tests/test_quickstart.py::test_training_runs_share_the_budget_or_the_duration_with_the_guide"),
    _m("quickstart: the cost probe keeps its fixed batch of 25", "quickstart.py",
       "batch = batch or p.batch", "batch = batch or 25",
       "tests/test_quickstart.py::test_costs_are_probed_at_the_generation_batch"),
    _m("quickstart: the cost probe keeps the fastest call", "quickstart.py",
       "return statistics.median(seconds)", "return min(seconds)",
       "tests/test_quickstart.py::test_seconds_per_call_is_the_median_after_a_warm_up"),
    _m("quickstart: train.py runs as one process on a CPU", "quickstart.py",
       "processes = min(p.cpu_processes, cores) if on_cpu else 1", "processes = 1",
       "tests/test_quickstart.py::test_training_launch_is_torchrun_with_a_share_of_the_cores_on_a_cpu"),
    _m("quickstart: each training process gets every core", "quickstart.py",
       "str(max(1, cores // processes))", "str(cores)",
       "tests/test_quickstart.py::test_training_launch_is_torchrun_with_a_share_of_the_cores_on_a_cpu"),
    _m("train: --adam-beta2 does not reach Adam", "train.py",
       "betas=[0.9, opts.adam_beta2]", "betas=[0.9, 0.999]",
       "tests/test_train.py::test_adam_beta2_option_sets_the_optimizer",
       "tests/test_edm2_training.py::test_preset_sets_the_official_hyperparameters"),
    _m("quickstart: a stage's environment does not reach its command", "quickstart.py",
       "text=True, env=env)", "text=True)",
       "tests/test_quickstart.py::test_stage_runs_its_command_under_the_launch_and_logs_it"),
    _m("quickstart: a preset's options are not checked before the stages run", "quickstart.py",
       "check_preset(preset_name, PRESETS[preset_name])", "None",
       "tests/test_quickstart.py::test_a_preset_option_no_stage_knows_stops_the_job_before_any_stage"),
    # --- The rooms' seams: callbacks, the sampler spec, file names, moved class paths.
    _m("callback: UniPC shows the corrected state instead of the one its D was evaluated at", SOLVERS,
       "report(callback, i + 1, sigmas[i + 1], x_pred, D_t)", "report(callback, i + 1, sigmas[i + 1], x, D_t)",
       "tests/test_samplers.py::test_every_named_sampler_shows_each_step_and_changes_nothing"),
    _m("callback: the paper's steps show the level before churn", PAPER,
       "callback(i, flow.sigma(t_hat), x_hat, step_denoised[0])",
       "callback(i, flow.sigma(t_cur), x_hat, step_denoised[0])",
       "tests/test_samplers.py::test_paper_samplers_show_each_step_after_churn"),
    _m("sampler spec: an ablation-only option alone still makes a PaperSampler", "training/sampling/spec.py",
       "    if ablation:\n", '    if set(ablation) & {"solver", "discretization", "schedule", "scaling"}:\n',
       "tests/test_sampling.py::test_the_sampler_spec_is_one_rule"),
    _m("sampler spec: the paper's sampler drops its churn", "training/sampling/spec.py",
       "self.rho, **asdict(self.churn), callback=callback)", "self.rho, callback=callback)",
       "tests/test_sampling.py::test_the_sampler_spec_is_one_rule"),
    _m("sampler spec: a named sampler's NFE ignores --steps", "training/sampling/spec.py",
       "2 * (num_steps or DEFAULT_NUM_STEPS) - 1", "2 * DEFAULT_NUM_STEPS - 1",
       "tests/test_sampling.py::test_the_sampler_spec_is_one_rule"),
    _m("sampler spec: a churned named sampler other than the paper's accepted", "training/sampling/spec.py",
       "if not sampler.paper and self.churn != Churn(S_noise=self.churn.S_noise):", "if False:",
       "tests/test_sampling.py::test_the_sampler_spec_is_one_rule"),
    _m("monitoring: a consistency run's grids sampled with Heun", "training/loop/monitor.py",
       "    if not isinstance(loss_fn, ConsistencyLoss):\n", "    if True:\n",
       "tests/test_consistency.py::test_the_training_loop_samples_a_consistency_model_with_two_calls_of_its_sampler"),
    _m("consistency under torchrun: EDM2's log-variance head left trainable", "training/loop/setup.py",
       "    freeze_what_the_loss_never_uses(state.net, loss_fn)\n", "",
       "tests/test_consistency.py::test_two_processes_tune_an_edm2_network_resume_bit_exactly_and_generate_py_samples_it"),
    _m("consistency under torchrun: the target renormalizes EDM2's weights", LOSS,
       "with torch.no_grad(), weights_left_as_they_are(net):", "with torch.no_grad():",
       "tests/test_consistency.py::test_two_processes_tune_an_edm2_network_resume_bit_exactly_and_generate_py_samples_it",
       "tests/test_consistency.py::test_the_target_leaves_edm2s_weights_as_the_student_left_them"),
    _m("EDM2: the forced weight normalization cannot be turned off", "training/networks/edm2.py",
       "        if self.training and self.force_weight_norm:", "        if self.training:",
       "tests/test_consistency.py::test_the_target_leaves_edm2s_weights_as_the_student_left_them"),
    _m("consistency: EDM's weighting without the square of t sigma_data", LOSS,
       "(t * self.sigma_data) ** 2).flatten()",
       "(t * self.sigma_data)).flatten()",
       "tests/test_consistency.py::test_loss_is_the_weighted_distance_of_the_two_calls"),
    _m("EDM2: dropout_res keeps dropout one level above it too", "training/networks/edm2.py",
       "if dropout_res is not None and res > dropout_res:", "if dropout_res is not None and res > 2 * dropout_res:",
       "tests/test_consistency.py::test_dropout_only_at_and_below_dropout_res"),
    _m("sampler spec: explicit levels ignored", "training/sampling/spec.py",
       "levels = self.time_steps if self.sigmas is None else torch.tensor(self.sigmas, dtype=torch.float64)",
       "levels = self.time_steps",
       "tests/test_samplers.py::test_explicit_levels_are_used_as_given_with_their_call_count"),
    _m("monitoring: a consistency run's chosen levels ignored", "training/loop/monitor.py",
       "    if loss_fn.sample_sigmas:\n", "    if False:\n",
       "tests/test_consistency.py::test_the_training_loop_samples_a_consistency_model_with_two_calls_of_its_sampler"),
    _m("ct recipes: ECT's per-step EMA beta read as a half-life in steps", "training/presets.py",
       "return math.log(0.5) / math.log(beta) * batch / 1e6", "return 1 / (1 - beta) * batch / 1e6",
       "tests/test_consistency.py::test_ct_recipes_are_ects_published_settings"),
    _m("ct recipes: the recipe overrides the options given", "train.py",
       "            if opts.get(key) is None or (key == \"consistency\" and not opts.get(key)):",
       "            if True:",
       "tests/test_consistency.py::test_ct_recipes_are_ects_published_settings"),
    _m("distillation: the teacher's Heun step is Euler's", LOSS,
       "return torch.where(r > 0, x + (r - t) * (slope + slope_r) / 2, x_r)", "return x_r",
       "tests/test_consistency.py::test_the_distillation_target_is_one_step_of_the_guided_teachers_ode"),
    _m("distillation: the target ignores the teacher", LOSS,
       "x_r = (y + r * n) if self.teacher is None else self.teacher_ode_step(y + t * n, t, r, labels)",
       "x_r = y + r * n",
       "tests/test_consistency.py::test_the_distillation_target_is_one_step_of_the_guided_teachers_ode"),
    _m("distillation: the teacher pickled into every snapshot", LOSS,
       'return {key: value for key, value in self.__dict__.items() if key != "teacher"}',
       "return dict(self.__dict__)",
       "tests/test_consistency.py::test_two_processes_distill_a_guided_teacher_which_stays_out_of_the_snapshots"),
    _m("distillation: the guide left out of the teacher", "train.py",
       "            c.teacher_kwargs.update(guide=opts.distill_guide, guidance=opts.distill_guidance)\n", "",
       "tests/test_consistency.py::test_two_processes_distill_a_guided_teacher_which_stays_out_of_the_snapshots"),
    _m("sampler options: errors name the library's keywords, not the command line's", "training/cli_options.py",
       '"discretization": "--disc", ', "",
       "tests/test_samplers.py::test_generate_bad_sampler_options_get_one_line"),
    _m("run files: the newest snapshot taken from every network-snapshot file", RUN_FILES,
       '                  if labelled_nimg(p) is not None]', "]", "tests/test_run_files.py"),
    _m("run files: a state file read with a snapshot's extension", RUN_FILES,
       '(STATE_PREFIX, "pt")', '(STATE_PREFIX, "p[tk]l?")', "tests/test_run_files.py"),
    _m("class paths: a moved module's old path no longer resolves", "dnnlib/util.py",
       "        obj = importlib.import_module(_moved_modules[module_name])",
       "        raise",
       "tests/test_saved_runs.py::test_saved_snapshots_load_with_every_object"),
)


# ----------------------------------------------------------------------------
# The runner.

def repository_files(root: str = REPO) -> list[str]:
    """The files git would give a clean clone plus untracked ones not ignored (new work in progress)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name and os.path.isfile(os.path.join(root, name))]


def copy_repository(destination: str, root: str = REPO) -> None:
    for name in repository_files(root):
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, name), target)


def check_applies(mutation: Mutation, root: str = REPO) -> str | None:
    """Why the mutation cannot be applied to the files under ``root`` (None if it can)."""
    path = os.path.join(root, mutation.path)
    if not os.path.isfile(path):
        return f"{mutation.path} does not exist"
    count = open(path, encoding="utf-8").read().count(mutation.old)
    if count != 1:
        return f"its text occurs {count} times in {mutation.path} (must be exactly once)"
    if mutation.old == mutation.new:
        return "it changes nothing"
    for test in mutation.tests:
        if not os.path.exists(os.path.join(root, test.split("::")[0])):
            return f"test {test} does not exist"
    return None


@dataclass
class Outcome:
    mutation: Mutation
    verdict: str              # 'caught', 'SURVIVED' or 'ERROR'
    seconds: float
    detail: str = ""


def run_one(mutation: Mutation, workdir: str, timeout: float) -> Outcome:
    """Apply one mutation inside ``workdir`` (a copy of the repository), run its tests, undo it."""
    start = time.time()
    problem = check_applies(mutation, workdir)
    if problem:
        return Outcome(mutation, "ERROR", 0.0, problem)
    path = os.path.join(workdir, mutation.path)
    original = open(path, encoding="utf-8").read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(mutation.old, mutation.new))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *mutation.tests]
        try:
            result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutation, "ERROR", time.time() - start, f"tests ran past {timeout:.0f} s")
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    seconds = time.time() - start
    if result.returncode == 1:  # pytest: some test failed.
        failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
        return Outcome(mutation, "caught", seconds, failed[0][7:] if failed else "")
    if result.returncode == 0:
        return Outcome(mutation, "SURVIVED", seconds, "all its tests passed")
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    return Outcome(mutation, "ERROR", seconds, f"pytest exit status {result.returncode}: {tail[0]}")


def run_mutations(mutations: list[Mutation], jobs: int = 2, timeout: float = 600, root: str = REPO,
                  report=None) -> list[Outcome]:
    """Run every mutation in a scratch copy of ``root``, ``jobs`` at a time; ``report`` gets one line each."""
    report = report or (lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory(prefix="mutations-") as scratch:
        workdirs: queue.Queue = queue.Queue()
        for j in range(max(1, min(jobs, len(mutations)))):
            workdir = os.path.join(scratch, f"job{j}")
            copy_repository(workdir, root)
            workdirs.put(workdir)

        def job(mutation: Mutation) -> Outcome:
            workdir = workdirs.get()
            try:
                outcome = run_one(mutation, workdir, timeout)
            finally:
                workdirs.put(workdir)
            report(f"{outcome.verdict:8s} {outcome.seconds:5.0f} s  {mutation.name}"
                   + (f"  [{outcome.detail}]" if outcome.detail else ""))
            return outcome

        with concurrent.futures.ThreadPoolExecutor(max_workers=workdirs.qsize()) as pool:
            return list(pool.map(job, mutations))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Apply each deliberate bug and check that its tests catch it.")
    parser.add_argument("-k", dest="patterns", action="append", default=[],
                        help="only mutations whose name contains this text (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="mutations tested at once (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per mutation (default 600)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.patterns or any(p in m.name for p in args.patterns)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path}; {', '.join(m.tests)})")
        return 0
    if not chosen:
        print(f"no mutation matches {args.patterns}", file=sys.stderr)
        return 2
    start = time.time()
    outcomes = run_mutations(chosen, jobs=args.jobs, timeout=args.timeout)
    survivors = [o for o in outcomes if o.verdict != "caught"]
    for o in survivors:
        print(f"not caught: {o.mutation.name} ({o.verdict}: {o.detail})")
    print(f"{len(outcomes) - len(survivors)} of {len(outcomes)} mutations caught, {len(survivors)} not, "
          f"in {time.time() - start:.0f} s")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
