"""The vocabularies every site must agree on: observations (tags), anatomical regions and the
zone atlas used when the data ships no region boxes.

Index order is part of the model contract (tag queries, tag vectors, region ids): append, never
reorder.
"""

# The 14 CheXpert observations (snake_case; CheXpert's "Support Devices" is `support_device`),
# then other common chest findings.
CHEXPERT_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices",
]
CHEXPERT_OBSERVATIONS = [
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum",
    "fracture", "lung_lesion", "lung_opacity", "no_finding", "pleural_effusion", "pleural_other",
    "pneumonia", "pneumothorax", "support_device",
]
OTHER_OBSERVATIONS = [
    "nodule", "mass", "granuloma", "emphysema", "hyperinflation", "calcification", "scarring",
    "fibrosis", "hernia", "scoliosis", "degenerative_change", "vascular_congestion",
    "tortuous_aorta", "hilar_enlargement", "interstitial_opacity", "pleural_thickening",
]
OBSERVATIONS = CHEXPERT_OBSERVATIONS + OTHER_OBSERVATIONS

# Anatomical regions named by the triplet extractor. Sides are the patient's.
REGIONS = [
    "right_lung", "left_lung",
    "right_upper_zone", "right_mid_zone", "right_lower_zone",
    "left_upper_zone", "left_mid_zone", "left_lower_zone",
    "right_apex", "left_apex",
    "right_costophrenic_angle", "left_costophrenic_angle",
    "right_hilum", "left_hilum",
    "heart", "mediastinum", "aorta", "trachea",
    "right_hemidiaphragm", "left_hemidiaphragm",
    "spine", "bones", "soft_tissue",
]

# Zone atlas for a frontal (PA/AP) view cropped to content: (x1, y1, x2, y2) in [0, 1] image
# coordinates. The patient's right is on the image's left.
ZONE_ATLAS = {
    "right_lung": (0.08, 0.10, 0.48, 0.85),
    "left_lung": (0.52, 0.10, 0.92, 0.85),
    "right_upper_zone": (0.08, 0.10, 0.48, 0.35),
    "right_mid_zone": (0.08, 0.35, 0.48, 0.60),
    "right_lower_zone": (0.08, 0.60, 0.48, 0.85),
    "left_upper_zone": (0.52, 0.10, 0.92, 0.35),
    "left_mid_zone": (0.52, 0.35, 0.92, 0.60),
    "left_lower_zone": (0.52, 0.60, 0.92, 0.85),
    "right_apex": (0.15, 0.06, 0.45, 0.20),
    "left_apex": (0.55, 0.06, 0.85, 0.20),
    "right_costophrenic_angle": (0.06, 0.72, 0.24, 0.90),
    "left_costophrenic_angle": (0.76, 0.72, 0.94, 0.90),
    "right_hilum": (0.30, 0.35, 0.46, 0.55),
    "left_hilum": (0.54, 0.35, 0.70, 0.55),
    "heart": (0.38, 0.45, 0.78, 0.82),
    "mediastinum": (0.40, 0.10, 0.60, 0.50),
    "aorta": (0.44, 0.18, 0.62, 0.40),
    "trachea": (0.46, 0.02, 0.54, 0.30),
    "right_hemidiaphragm": (0.08, 0.75, 0.48, 0.92),
    "left_hemidiaphragm": (0.52, 0.78, 0.92, 0.95),
    "spine": (0.45, 0.00, 0.55, 1.00),
    "bones": (0.00, 0.00, 1.00, 1.00),
    "soft_tissue": (0.00, 0.00, 1.00, 1.00),
}
assert list(ZONE_ATLAS) == REGIONS
