"""The six issue categories and the error codes that refine them (docs/analysis.md).

Every unit gets exactly one category (precedence top-down in CATEGORIES) and exactly one error code.
Rules are vectorised boolean masks over the per-unit table; the first matching rule wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Precedence order for assignment.
CATEGORIES = ["aleatoric_hotspot", "critical_hotspot", "hotspot", "recessive_hotspot", "operational_coverage",
              "stable_coverage"]
# Column order of issue_category_summary(), as on the product page.
CATEGORY_SUMMARY_ORDER = ["stable_coverage", "operational_coverage", "hotspot", "recessive_hotspot",
                          "critical_hotspot", "aleatoric_hotspot"]

# Thresholds of the rules; named so docs and tests can refer to them.
LABEL_NOISE_AGREEMENT = 0.2  # neighbours agreeing with the label at most this share
OWN_DATASET_AGREEMENT = 0.5  # above this share of same-dataset neighbours agreeing, a label is not noise
NOISE_AUM = 0.0
NOISE_CORRECTNESS = 0.2
NEAR_TIE_GAP = 0.1  # top-2 probability gap of an ambiguous prediction
SPLIT_SHARE = 0.3  # each of the two tied classes holds at least this share of the neighbours
UNSTABLE_VARIABILITY = 0.2
STABLE_VARIABILITY = 0.1
SPARSE_DENSITY = 90.0  # mean-neighbour-distance percentile above which a region is sparse
OOD_DENSITY = 99.0


@dataclass(frozen=True)
class ErrorCode:
    code: str
    description: str
    recommendation: str


CLASSIFICATION_CODES = {c.code: c for c in [
    ErrorCode("CLS_LABEL_NOISE",
              "Wrong, and the label is the likely culprit: nearby samples carry the predicted class, or the "
              "model never fits the label (negative AUM, rarely correct).",
              "Review these labels first (relabel or drop); check the labelling guideline for the confused pair."),
    ErrorCode("CLS_AMBIGUOUS",
              "Near-tie between the label and the prediction, with neighbours split between the two classes.",
              "Sharpen the class definitions or allow multi-label / an 'uncertain' class for such inputs."),
    ErrorCode("CLS_OUT_OF_DISTRIBUTION",
              "Wrong on an input far from everything in the training set (beyond the 99th percentile of "
              "the reference set's neighbour distances).",
              "Collect training data like these inputs, or detect and reject such inputs at inference."),
    ErrorCode("CLS_FORGOTTEN",
              "Predicted correctly at an earlier epoch, then forgotten.",
              "Check learning-rate schedule and augmentation; consider rehearsal or early-stopping checkpoints."),
    ErrorCode("CLS_REGION_FAILURE",
              "Wrong inside a feature-space region whose error rate is significantly above the dataset's.",
              "Inspect the region's samples together: a missing feature, a shortcut or a sub-population "
              "needs more or better data."),
    ErrorCode("CLS_UNDERREPRESENTED",
              "Wrong in a sparse part of feature space (few similar training samples).",
              "Add training samples similar to these; oversample or augment the sub-population."),
    ErrorCode("CLS_CONFIDENT_ERROR",
              "Wrong although the error estimate accepted it: a silent, confident failure.",
              "Look for shortcuts or spurious features; calibrate (temperature scaling) and add counter-examples."),
    ErrorCode("CLS_UNCERTAIN_ERROR",
              "Wrong, and the model knew it was unsure (rejected at the operating threshold).",
              "More or better data for these inputs; route them to a fallback or a human at inference."),
    ErrorCode("CLS_UNSTABLE",
              "Right now, but the probability of the label varies strongly across epochs.",
              "Latent error: average checkpoints (EMA/SWA) or lower the learning rate; watch these samples."),
    ErrorCode("CLS_IN_HOTSPOT_REGION",
              "Right, but inside a region where many neighbours are wrong.",
              "Latent error: strengthen the region's data before it shows up in accuracy."),
    ErrorCode("CLS_LOW_MARGIN",
              "Right, but rejected at the operating threshold (low margin).",
              "Latent error: more data near the decision boundary; consider margin-based losses."),
    ErrorCode("CLS_ACCEPTED",
              "Right and accepted at the operating risk, not yet stable.",
              "Safe at the chosen risk; no action needed."),
    ErrorCode("CLS_STABLE",
              "Right, far below the operating risk, outside hotspot regions and never forgotten.",
              "Reliably handled; candidates to down-weight when the data budget is tight."),
]}


# Data traced without labels (operation-time logs, unlabelled pools): what can be said without a label.
UNLABELLED_CODES = {c.code: c for c in [
    ErrorCode("OP_OUT_OF_DISTRIBUTION",
              "Far from everything in the training set (beyond the 99th percentile of the reference set's "
              "neighbour distances).",
              "Check these inputs for a new source, sensor or population; collect and label some for training."),
    ErrorCode("OP_REJECTED_IN_HOTSPOT",
              "Rejected at the operating threshold, inside a region where the model fails on the training set.",
              "Route to a fallback or a human; label examples of the region (result.select(strategy='hotspot'))."),
    ErrorCode("OP_REJECTED",
              "Rejected at the operating threshold: error_proba at or above tau_op.",
              "Route to a fallback or a human; label the most uncertain ones (result.select())."),
    ErrorCode("OP_IN_HOTSPOT_REGION",
              "Accepted, but inside a region where the model fails on the training set.",
              "Watch the share of such inputs over time (result.monitoring())."),
    ErrorCode("OP_ACCEPTED",
              "Accepted at the operating risk.",
              "No action needed."),
]}


def assign_unlabelled(samples: pd.DataFrame, tau_op: "float | np.ndarray") -> pd.DataFrame:
    """Add ``accepted``, ``out_of_distribution`` and ``error_code`` (UNLABELLED_CODES, first match wins) to
    the label-free per-unit table of rows traced without labels (``tau_op``: one threshold, or one per row)."""
    accepted = samples["error_proba"].to_numpy(dtype=float) < tau_op
    far = samples["density"].to_numpy(dtype=float) >= OOD_DENSITY
    hot = samples["in_hotspot_region"].to_numpy(dtype=bool)
    out = samples.copy()
    out["accepted"] = accepted
    out["out_of_distribution"] = far
    out["error_code"] = np.select([far, ~accepted & hot, ~accepted, hot], list(UNLABELLED_CODES)[:4],
                                  default="OP_ACCEPTED")
    return out


def assign_classification(samples: pd.DataFrame, tau_op: float, tau_stable: float, reference: bool) -> pd.DataFrame:
    """Add ``category`` and ``error_code`` to the per-unit table of one dataset and epoch.

    ``reference``: whether these units are the reference set itself (out-of-distribution is only
    meaningful for other datasets).
    """
    def col(name: str, default: float = np.nan) -> np.ndarray:
        return samples[name].to_numpy(dtype=float) if name in samples else np.full(len(samples), default)

    wrong = ~samples["correct"].to_numpy(dtype=bool)
    pred = samples["pred"].to_numpy()
    error_proba = col("error_proba")
    accepted = error_proba < tau_op
    agreement = col("neighbor_label_agreement")
    majority = samples["neighbor_majority_label"].to_numpy() if "neighbor_majority_label" in samples else np.full(len(samples), -1)
    aum, correctness = col("aum"), col("correctness")
    # stability rules use the recent window of the trajectory (see dynamics.py for why)
    forgetting, variability = np.nan_to_num(col("forgetting_events"), nan=0.0), col("recent_variability")
    density, hot_region = col("density"), samples.get("in_hotspot_region", pd.Series(False, index=samples.index)).to_numpy(dtype=bool)
    split = (col("top2_gap") < NEAR_TIE_GAP) & (col("neighbor_label_agreement") >= SPLIT_SHARE) & (
        col("neighbor_pred_agreement") >= SPLIT_SHARE)

    # Label noise: the label disagrees with the reference neighbours, which agree with the prediction, and
    # with most neighbours in the unit's own dataset (a coherent group sharing the label is a region the
    # model fails on, not noise); or the model never fits the label (AUM < 0, rarely correct).
    own_disagrees = ~(col("dataset_label_agreement", default=0.0) > OWN_DATASET_AGREEMENT)
    noise = wrong & ((((agreement <= LABEL_NOISE_AGREEMENT) & (majority == pred)) & own_disagrees) |
                     ((aum < NOISE_AUM) & (correctness < NOISE_CORRECTNESS)))
    ambiguous = wrong & ~noise & split
    aleatoric = noise | ambiguous
    critical = wrong & ~aleatoric & accepted
    hotspot = wrong & ~aleatoric & ~accepted
    fragile = (~accepted) | hot_region | (forgetting >= 1) | (variability >= UNSTABLE_VARIABILITY)
    recessive = ~wrong & fragile
    has_dynamics = ~np.isnan(variability)
    stable = (~wrong & ~recessive & (error_proba < tau_stable) & ~hot_region
              & (~has_dynamics | ((forgetting == 0) & (variability < STABLE_VARIABILITY))))
    operational = ~wrong & ~recessive & ~stable

    category = np.select([aleatoric, critical, hotspot, recessive, operational, stable], CATEGORIES, default="")
    far = (density >= OOD_DENSITY) & (not reference)
    sparse = density >= SPARSE_DENSITY
    forgotten = forgetting >= 1
    error_code = np.select(
        [noise, ambiguous,
         wrong & far, wrong & hot_region, wrong & forgotten, wrong & sparse, critical, hotspot,
         recessive & forgotten, recessive & (variability >= UNSTABLE_VARIABILITY), recessive & hot_region, recessive,
         operational, stable],
        ["CLS_LABEL_NOISE", "CLS_AMBIGUOUS",
         "CLS_OUT_OF_DISTRIBUTION", "CLS_REGION_FAILURE", "CLS_FORGOTTEN", "CLS_UNDERREPRESENTED",
         "CLS_CONFIDENT_ERROR", "CLS_UNCERTAIN_ERROR",
         "CLS_FORGOTTEN", "CLS_UNSTABLE", "CLS_IN_HOTSPOT_REGION", "CLS_LOW_MARGIN",
         "CLS_ACCEPTED", "CLS_STABLE"], default="")
    out = samples.copy()
    out["category"] = category
    out["error_code"] = error_code
    return out


# -- 2D detection (TIDE's error types, Bolya et al. 2020, plus annotation and stability codes) ------------
WEAK_LOC_IOU = 0.6  # a true positive below this IoU is only just matched

DETECTION_CODES = {c.code: c for c in [
    ErrorCode("OD_DUPLICATE_GT",
              "The ground truth repeats a box of the same class in the same image (IoU >= 0.9).",
              "Deduplicate the annotations; a duplicate counts as a miss that no model can avoid."),
    ErrorCode("OD_LABEL_NOISE",
              "The object is detected with the same other class, confidently, in several epochs: its label "
              "is likely wrong.",
              "Review the object's class label and the guideline for the confused pair of classes."),
    ErrorCode("OD_MISSING_LABEL",
              "A confident detection where no box is drawn, repeated at the same place across epochs: "
              "probably an object the annotators missed.",
              "Check these images for unlabelled objects and add the boxes."),
    ErrorCode("OD_CLS",
              "Localised correctly (IoU >= 0.5) but with the wrong class, above the operating score.",
              "Look at the confused classes: more examples of each, or merge classes that are not separable."),
    ErrorCode("OD_LOC",
              "Right class but poorly localised (0.1 <= IoU < 0.5), above the operating score.",
              "Improve box regression: anchor / input sizes for these object sizes, higher-resolution inputs, "
              "a localisation-quality loss (GIoU)."),
    ErrorCode("OD_BOTH",
              "Wrong class and poorly localised, above the operating score.",
              "Usually crowded or occluded scenes: check these images, add such examples."),
    ErrorCode("OD_DUPE",
              "A second detection of an object already detected (would be a TP without the first).",
              "Tune NMS (IoU threshold) or use a duplicate-aware head."),
    ErrorCode("OD_BKG",
              "A confident detection on background (IoU < 0.1 with every object).",
              "Add hard negatives like these; check whether they are unlabelled objects."),
    ErrorCode("OD_MISS",
              "An object no detection finds at the operating score and no other error explains.",
              "More examples of such objects (class, size, context); check small-object resolution."),
    ErrorCode("OD_UNSTABLE",
              "Found now, but found and lost again across epochs (or its score varies strongly).",
              "Latent miss: average checkpoints (EMA/SWA) or lower the learning rate; watch these objects."),
    ErrorCode("OD_WEAK_LOC",
              f"Found, but only just localised (IoU < {WEAK_LOC_IOU}).",
              "Latent localisation error: check box quality of these annotations and the regression loss."),
    ErrorCode("OD_IN_HOTSPOT_SLICE",
              "Found, but in a class x size slice whose error rate is significantly above the dataset's.",
              "Latent error: strengthen that slice's data before it shows up in AP."),
    ErrorCode("OD_LOW_SCORE",
              "Found, but with a high estimated miss probability (rejected at the operating risk).",
              "Latent miss: more data like it; it is the first to disappear when the threshold moves."),
    ErrorCode("OD_OK",
              "Found and accepted at the operating risk, not yet stable.",
              "Safe at the chosen risk; no action needed."),
    ErrorCode("OD_STABLE",
              "Found, far below the operating risk, outside hotspot slices and never lost across epochs.",
              "Reliably handled."),
]}


def assign_detection(samples: pd.DataFrame, tau_op: float, tau_stable: float, prefix: str = "OD") -> pd.DataFrame:
    """Add ``category`` and ``error_code`` to the per-unit table of one detection dataset and epoch.

    Units: ground-truth objects (``unit == "gt"``) and unexplained false positives (``"pred"``) at the
    operating score. Columns used: correct, error_type (TP, Miss, Cls, Loc, Both, Dupe, Bkg), tp_issue (what
    is fragile about a found object: 2D ``WEAK_LOC``; 3D ``FLIP``, ``ORIENTATION``, ``SCALE``,
    ``VELOCITY``), duplicate_gt, repeated_errors, error_proba, in_hotspot_slice and the dynamics
    (forgetting_events, variability, recent_variability). ``prefix``: ``OD`` (2D) or ``OD3D``.
    """
    def col(name: str, default: float = np.nan) -> np.ndarray:
        return samples[name].to_numpy(dtype=float) if name in samples else np.full(len(samples), default)

    gt = samples["unit"].to_numpy() == "gt"
    correct = samples["correct"].to_numpy(dtype=bool)
    wrong = ~correct
    kind = samples["error_type"].to_numpy(dtype=object)
    issue = samples["tp_issue"].to_numpy(dtype=object) if "tp_issue" in samples else np.full(len(samples), "")
    repeated = col("repeated_errors", 0.0) >= 1
    duplicate = gt & samples["duplicate_gt"].to_numpy(dtype=bool)
    label_noise = gt & wrong & (kind == "Cls") & repeated & ~duplicate
    missing_label = ~gt & (kind == "Bkg") & repeated
    aleatoric = duplicate | label_noise | missing_label
    critical = wrong & ~aleatoric & (~gt | np.isin(kind, ["Cls", "Loc", "Both"]))
    hotspot = wrong & ~aleatoric & ~critical

    error_proba = col("error_proba")
    forgetting, variability = np.nan_to_num(col("forgetting_events"), nan=0.0), col("recent_variability")
    hot_slice = samples.get("in_hotspot_slice", pd.Series(False, index=samples.index)).to_numpy(dtype=bool)
    ok = correct & ~aleatoric
    unstable = ok & ((forgetting >= 1) | (variability >= UNSTABLE_VARIABILITY))
    fragile_match = ok & (issue != "")
    low_score = ok & ~(error_proba < tau_op)
    recessive = unstable | fragile_match | (ok & hot_slice) | low_score
    has_dynamics = ~np.isnan(variability)
    stable = (ok & ~recessive & (error_proba < tau_stable) & ~hot_slice
              & (~has_dynamics | ((forgetting == 0) & (col("variability") < STABLE_VARIABILITY))))
    operational = ok & ~recessive & ~stable

    category = np.select([aleatoric, critical, hotspot, recessive, operational, stable], CATEGORIES, default="")
    error_code = np.select(
        [duplicate, label_noise, missing_label,
         critical & (kind == "Cls"), critical & (kind == "Loc"), critical & (kind == "Both"),
         critical & (kind == "Dupe"), critical, hotspot,
         unstable, fragile_match, recessive & hot_slice, recessive, operational, stable],
        ["DUPLICATE_GT", "LABEL_NOISE", "MISSING_LABEL", "CLS", "LOC", "BOTH", "DUPE", "BKG", "MISS",
         "UNSTABLE", "", "IN_HOTSPOT_SLICE", "LOW_SCORE", "OK", "STABLE"], default="").astype(object)
    error_code = np.where(fragile_match & ~unstable, issue, error_code)
    out = samples.copy()
    out["category"] = category
    out["error_code"] = prefix + "_" + pd.Series(error_code, index=samples.index).astype(str)
    return out


# -- 3D detection: nuScenes matching at 2 m (codes of ANALYSIS.md plus the annotation / stability ones) ----
DETECTION3D_CODES = {c.code: c for c in [
    ErrorCode("OD3D_DUPLICATE_GT", "The ground truth repeats a box of the same class within 0.25 m in the same frame.",
              "Deduplicate the annotations; a duplicate counts as a miss no model can avoid."),
    ErrorCode("OD3D_LABEL_NOISE",
              "The object is detected with the same other class, confidently, in several epochs: its label is "
              "likely wrong.", "Review the object's class and the guideline for the confused pair."),
    ErrorCode("OD3D_MISSING_LABEL",
              "A confident detection with no object within 2 m, repeated at the same place across epochs: "
              "probably an unannotated object.", "Check these frames for unlabelled objects and add the boxes."),
    ErrorCode("OD3D_CLS", "An object of another class within 2 m of a confident detection.",
              "More examples of the confused classes; check class definitions (e.g. truck vs. bus)."),
    ErrorCode("OD3D_LOC", "The right class but matched only at 4 m: the centre is 2-4 m off.",
              "Improve centre regression at this range: voxel size, BEV resolution, depth estimation (camera)."),
    ErrorCode("OD3D_BOTH", "Wrong class and poorly localised.", "Check crowded scenes; add such examples."),
    ErrorCode("OD3D_DUPE", "A second detection of an object already detected within 2 m.",
              "Tune NMS (or the query de-duplication of DETR-style heads)."),
    ErrorCode("OD3D_BKG", "A confident detection with no object within 2 m.",
              "Add hard negatives like these; check whether they are unlabelled objects."),
    ErrorCode("OD3D_MISS", "An object no reported detection finds within 2 m and no other error explains.",
              "More examples of such objects (class, range, occlusion); check point density at that range."),
    ErrorCode("OD3D_UNSTABLE", "Found now, but found and lost again across epochs (or its score varies strongly).",
              "Latent miss: average checkpoints (EMA) or lower the learning rate; watch these objects."),
    ErrorCode("OD3D_FLIP", f"Found, but its heading is reversed (yaw error > {150}°).",
              "Check heading encoding (sin/cos vs. direction classifier) and front/back labels."),
    ErrorCode("OD3D_ORIENTATION", f"Found, but its yaw is more than {30}° off.",
              "Improve orientation regression; check yaw conventions of the labels."),
    ErrorCode("OD3D_SCALE", "Found, but its size is wrong (1 - aligned IoU of the sizes > 0.3).",
              "Check anchor sizes / size priors per class and the annotations' size convention."),
    ErrorCode("OD3D_VELOCITY", "Found, but its velocity is more than 1 m/s off.",
              "Check multi-sweep input and velocity labels; more temporal context."),
    ErrorCode("OD3D_IN_HOTSPOT_SLICE",
              "Found, but in a class x distance band whose error rate is significantly above the dataset's.",
              "Latent error: strengthen that range and class in the data."),
    ErrorCode("OD3D_LOW_SCORE", "Found, but with a high estimated miss probability (rejected at the operating risk).",
              "Latent miss: more data like it."),
    ErrorCode("OD3D_OK", "Found and accepted at the operating risk, not yet stable.", "No action needed."),
    ErrorCode("OD3D_STABLE", "Found, far below the operating risk, outside hotspot slices, never lost.",
              "Reliably handled."),
]}
