"""Every metric key a run logs, defined once: the reference of what metrics.jsonl holds.

Keys read `prefix/name` and are grouped below by prefix. The trainer writes them (metrics.jsonl, TensorBoard,
W&B); `jackpot plot`, the run summary and the progress bar read them. docs/METHOD.md §9.1 maps them to
verl's names. Some groups are returned by a function without their prefix (jackpot.core.divergences'
mismatch metrics, a correction's shared statistics, an evaluation's scores): their bare names are defined
here too, and the logged key is prefix + name. Plain strings only, so that jackpot.core may import this module.
"""

from __future__ import annotations

# reward/, response/: the step's rollouts as the task scored them
REWARD_MEAN = "reward/mean"                        # mean reward over the step's responses
RESPONSE_LENGTH = "response/length"                # mean response length in tokens

# rollout/: which weights sampled the step's batch (the engine's version stamp, `RolloutBatch.model_version`)
ROLLOUT_MODEL_VERSION = "rollout/model_version"    # the sampling weights' version: step s samples with version s
ROLLOUT_STALENESS = "rollout/staleness"            # step - model_version: updates the sampler lags (0: synchronous)

# mismatch/: p_inf (recorded at sampling) against p_old (the policy at collection) on the sampled tokens
# (jackpot.core.divergences returns the bare names; verl's rollout_corr/*)
MISMATCH = "mismatch/"
KL_K1, KL_K2, KL_K3 = "kl_k1", "kl_k2", "kl_k3"    # sampled-token estimators of KL(p_inf || p_old)
CHI2_TOKEN, CHI2_SEQ = "chi2_token", "chi2_seq"    # E[rho^2] - 1 per token, per sequence
ESS = "ess"                                        # normalised effective sample size of rho, in (0, 1]
RATIO_MIN, RATIO_MAX = "ratio_min", "ratio_max"    # extremes of rho = p_old / p_inf
FRAC_ABOVE, FRAC_BELOW = "frac_above", "frac_below"  # fractions of tokens with rho above / below the bounds
LOG_PPL_DIFF, LOG_PPL_ABS_DIFF, PPL_RATIO = "log_ppl_diff", "log_ppl_abs_diff", "ppl_ratio"  # perplexity gap
MISMATCH_KL_K3 = MISMATCH + KL_K3
MISMATCH_ROLLOUT_MODEL_KL_K3 = MISMATCH + "rollout_model_" + KL_K3  # the rollout model at prepare vs p_inf
MISMATCH_KL_K3_CLIPPED = MISMATCH + KL_K3 + "_clipped"  # kl_k3 with each token's k3 capped (distill.signal_cap)

# tis/, icepop/, obrs/: the correction's statistics (jackpot.core.corrections); obrs/ is Jackpot's
TIS, ICEPOP, OBRS = "tis/", "icepop/", "obrs/"
WEIGHT_MEAN = "weight_mean"                        # mean of weight x kept over response tokens
WEIGHT_MAX, WEIGHT_MIN = "weight_max", "weight_min"  # extremes of the weight over response tokens
MASKED_FRAC = "masked_frac"                        # fraction of response tokens the correction drops
LOG_RATIO_MEAN = "log_ratio_mean"                  # mean clamped log(p_tgt / p_inf)
TIS_CLIPPED_FRAC = TIS + "clipped_frac"            # fraction of tokens whose ratio is above the cap
TIS_CLIPPED_LOW_FRAC = TIS + "clipped_low_frac"    # the same below cap_min
OBRS_ACCEPT_RATE = OBRS + "accept_rate"            # fraction of tokens OBRS keeps
OBRS_ACCEPT_PROB_MEAN = OBRS + "accept_prob_mean"  # mean acceptance probability min(1, rho / lambda)
OBRS_LAMBDA = OBRS + "lambda"                      # lambda used (fixed, or solved for the budget)
OBRS_Z_MEAN = OBRS + "z_mean"                      # mean per-state normaliser Z
OBRS_C1_CLIPPED_FRAC = OBRS + "c1_clipped_frac"    # fraction of weights clipped at c1
OBRS_KAPPA = OBRS + "kappa"                        # top-k Z's scale: mean acceptance / mean Z_approx
OBRS_TOPK_Z_MEAN = OBRS + "topk_z_mean"            # mean top-k Z before kappa
OBRS_LOSS_WEIGHT_MEAN = OBRS + "loss_weight_mean"  # the verl integration's mean loss weight

# policy/: the policy's update, averaged over its optimizer steps
POLICY_LOSS = "policy/loss"                        # the corrected PPO loss
POLICY_CLIPFRAC = "policy/clipfrac"                # fraction of kept tokens where the PPO clip binds
POLICY_CLIPFRAC_LOWER = "policy/clipfrac_lower"    # fraction of kept tokens clipped by the dual clip
POLICY_RATIO_MEAN = "policy/ratio_mean"            # mean p_new / p_old over response tokens
POLICY_GRAD_NORM = "policy/grad_norm"              # gradient norm before clipping

# rollout_model/: the jointly trained rollout model's update (PPO + distillation toward the policy)
ROLLOUT_MODEL_PPO_LOSS = "rollout_model/ppo_loss"
ROLLOUT_MODEL_DISTILL_KL = "rollout_model/distill_kl"
ROLLOUT_MODEL_GRAD_NORM = "rollout_model/grad_norm"
ROLLOUT_MODEL_DISTILL_COEF = "rollout_model/distill_coef"  # the distillation coefficient the step's update used
ROLLOUT_MODEL_DISTILL_KL_ERROR = "rollout_model/distill_kl_error"  # distill.target_kl: clipped log(gap / target)
ROLLOUT_MODEL_LR_SCALE = "rollout_model/lr_scale"  # distill.control='lr': the multiplier of rollout_model.lr

# eval/, eval_rollout_model/: held-out evaluation of the policy and of the rollout model (bare names from
# jackpot.train.loop.evaluate)
EVAL, EVAL_ROLLOUT_MODEL = "eval/", "eval_rollout_model/"
ACCURACY = "accuracy"                              # Mean@k over the held-out prompts
ACCURACY_SE = "accuracy_se"                        # its standard error over prompts


def pass_at(k: int) -> str:
    """The bare name of Pass@k: `pass@4`."""
    return f"pass@{k}"


EVAL_ACCURACY, EVAL_ACCURACY_SE = EVAL + ACCURACY, EVAL + ACCURACY_SE
EVAL_ROLLOUT_MODEL_ACCURACY = EVAL_ROLLOUT_MODEL + ACCURACY
EVAL_ROLLOUT_MODEL_ACCURACY_SE = EVAL_ROLLOUT_MODEL + ACCURACY_SE

# perf/: wall-clock seconds of a step's phases, and throughput
PERF_ROLLOUT_S = "perf/rollout_s"                  # sampling and scoring (async: the generator's time on the batch)
PERF_PREPARE_S = "perf/prepare_s"                  # log-probs, Z and the correction (no gradients)
PERF_UPDATE_S = "perf/update_s"                    # the optimizer steps
PERF_RECORDED_OLD = "perf/recorded_old"            # 1: the engine's log-probs served as the sampling model's old ones
PERF_STEP_S = "perf/step_s"                        # the three together
PERF_ROLLOUT_WAIT_S = "perf/rollout_wait_s"        # rollout.async_steps > 0: the trainer waiting for its batch
PERF_GENERATOR_IDLE_S = "perf/generator_idle_s"    # rollout.async_steps > 0: the generator waiting for a job
PERF_ROLLOUT_TOKENS_PER_S = "perf/rollout_tokens_per_s"  # response tokens sampled per second
PERF_EVAL_S = "perf/eval_s"                        # one evaluation (policy, and rollout model if any)
# perf/flops*, perf/gpu_model_s*: the step's FLOPs and modelled GPU seconds (a roofline model, not a measurement),
# by phase (jackpot.train.costs.PHASES) and in total; docs/METHOD.md §11
PERF_FLOPS = "perf/flops"                          # FLOPs of the step, every phase
PERF_GPU_MODEL_S = "perf/gpu_model_s"              # modelled H100 seconds of the step, every phase


def perf_flops(phase: str) -> str:
    """The FLOPs of one phase: `perf/flops_generation`."""
    return f"{PERF_FLOPS}_{phase}"


def perf_gpu_model_s(phase: str) -> str:
    """The modelled GPU seconds of one phase: `perf/gpu_model_s_generation`."""
    return f"{PERF_GPU_MODEL_S}_{phase}"
