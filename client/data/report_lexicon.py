"""The report extractor's vocabulary: finding, normal-statement, trigger and anatomy lexicons (data only).

Patterns match lower-case sentence text with '-' and '/' read as spaces; `client.data.reports` compiles
and applies them. Any change here changes every stored parse (the index re-parses: `parser_fingerprint`).
"""
from __future__ import annotations

import re

_GAP = r"(?: [a-z_]+){0,4}?"  # up to four words between a subject and its predicate

# (observations, pattern). At one position the earlier entry wins, so longer phrases come first.
FINDING_LEXICON: list[tuple[tuple[str, ...], str]] = [
    # Phrases that name no finding although they contain a lexicon word.
    ((), r"pericardial effusions?|joint effusions?|bone density|bone mineral density|sclerotic densit(?:y|ies)"
         r"|breast (?:prosthes[ie]s|implants?)|soft tissue (?:o?edema|swelling)"
         r"|(?:sclerotic|lytic|blastic|bony|bone|osseous|destructive|skin|cutaneous) lesions?"),
    (("nodule", "lung_opacity"), r"nodular (?:opacit(?:y|ies)|densit(?:y|ies))"),
    (("cardiomegaly", "enlarged_cardiomediastinum"),
     r"(?:enlarged|prominent) cardiomediastinal (?:silhouette|contours?)"
     rf"|cardiomediastinal (?:silhouette|contours?)s?{_GAP} (?:enlarged|large|widened|prominent)"),
    (("cardiomegaly",),
     r"cardiomegaly|cardiac enlargement|cardiac hypertrophy|heart enlargement"
     r"|enlargement of the (?:heart|cardiac (?:silhouette|shadow|contour))"
     r"|(?:enlarged|large|prominent) (?:heart|cardiac (?:silhouette|shadow|size|contour))"
     rf"|(?:heart|cardiac (?:silhouette|shadow|size|contour)s?){_GAP}"
     r" (?:enlarged|large|increased|prominent|enlarging|borderline)"
     r"|borderline (?:heart|cardiac) size"),
    (("enlarged_cardiomediastinum",),
     r"(?:widen(?:ed|ing)|enlarged|prominent) (?:superior )?mediast\w*(?: silhouette| contours?)?"
     rf"|mediastin\w*(?: silhouette| contours?)?{_GAP} (?:widen(?:ed|ing)|enlarged|prominent)"),
    (("pneumothorax", "pleural_effusion"), r"hydropneumothora(?:x|ces)"),
    (("pneumothorax",), r"pneumothora(?:x|ces)|pleural air(?: collection)?"),
    (("pleural_effusion",),
     r"(?:pleural )?effusions?|pleural fluid|hydrothora(?:x|ces)|fluid in the (?:\w+ )?fissure"
     r"|blunt(?:ed|ing)(?: of)?(?: the)?(?: \w+){0,2}? (?:costophrenic|cp) (?:angles?|sulc(?:us|i)|recess(?:es)?)"
     r"|(?:costophrenic|cp) (?:angles?|sulc(?:us|i))(?: \w+){0,2}? blunt(?:ed|ing)"),
    (("pleural_thickening",),
     r"pleural (?:thickening|plaques?|scarring|calcifications?)|apical (?:pleural )?cap(?:s|ping)?"
     r"|pleuroparenchymal (?:scarring|thickening|opacit(?:y|ies))"),
    (("granuloma",),
     r"(?:calcified |noncalcified )?granulom(?:a|as|ata)|granulomatous(?: \w+)?"
     r"|calcified (?:pulmonary |lung |parenchymal )?"
     r"(?:nodul(?:e|es|ar densit(?:y|ies)|ar opacit(?:y|ies))|densit(?:y|ies)|foc(?:us|i))"),
    # An interstitial opacity is an opacity; interstitial markings or prominence are not.
    (("interstitial_opacity", "lung_opacity"),
     r"(?:interstitial|reticular|reticulonodular|reticulo nodular)(?: \w+)?"
     r" (?:opacit(?:y|ies)|densit(?:y|ies)|infiltrat(?:e|es|ion))"),
    (("interstitial_opacity",),
     r"(?:interstitial|reticular|reticulonodular|reticulo nodular)(?: \w+)?"
     r" (?:markings?|prominence|pattern|disease|lung disease|abnormalit(?:y|ies)|changes?|thickening)"
     r"|(?:increased|prominent|coarse(?:ned)?|accentuated) (?:\w+ )?"
     r"(?:lung |interstitial |pulmonary |bronchovascular )?markings"
     r"|peribronchial (?:thickening|cuffing)|bronchial wall thickening|bronchitic changes"),
    (("nodule",), r"nodul(?:e|es|arity)|micronodul\w*"),
    (("mass",), r"mass(?:es)?|mass like"),
    (("lung_lesion",), r"lesions?|neoplasms?|tumou?rs?|malignan(?:cy|cies)|metasta(?:sis|ses|tic)|carcinoma|cancer"),
    (("edema",),
     r"(?:pulmonary |interstitial |alveolar |perihilar )?o?edema|fluid overload|(?:congestive )?heart failure|chf"),
    (("vascular_congestion",),
     r"(?:pulmonary |vascular |venous |interstitial )*congest(?:ion|ive changes?)"
     r"|vascular engorgement|engorged|cephali[sz]ation"
     r"|(?:increased|prominent|prominence of the)(?: \w+){0,2}? vascular(?:ity|ture)"
     r"|vascular(?:ity|ture)(?: \w+){0,2}? (?:increased|prominent|indistinct)"),
    (("emphysema",),
     r"emphysema(?:tous)?(?: changes?)?|copd|chronic obstructive(?: \w+){0,2}|bullae|bullous(?: \w+)?|bulla"),
    (("hyperinflation",),
     r"hyper ?(?:inflat|expan|aerat|lucen)\w*|over ?(?:inflat|expan)\w*"
     r"|(?:flatten(?:ed|ing)(?: of)?(?: the)?|flat) (?:hemi)?diaphragms?"
     r"|(?:hemi)?diaphragms?(?: \w+){0,2}? flat(?:tened)?"),
    (("atelectasis",), r"atelectas(?:is|es)|atelectatic(?: \w+)?|(?:lobar |segmental )?collapsed?|volume loss"),
    (("consolidation",), r"consolidat(?:ion|ions|ed|ive|ing)"),
    (("pneumonia",), r"(?:broncho)?pneumoni(?:a|as|tis)|infectious process|infection|aspiration"),
    (("lung_opacity",),
     r"opacit(?:y|ies)|opacifi(?:cation|ed)"
     r"|(?:airspace|air space|alveolar) (?:disease|process|opacit(?:y|ies)|filling)"
     r"|infiltrat(?:e|es|ion|ive(?: \w+)?)|densit(?:y|ies)|haziness|hazy(?: \w+)?|ground glass|shadowing"),
    (("scarring",), r"scar(?:s|ring|red)?|cicatri\w*|fibrotic scar\w*"),
    (("fibrosis",), r"fibros(?:is|es)|fibrotic(?: changes?)?"),
    (("calcification",), r"calcifi(?:cation|cations|ed)(?: \w+)?|atherosclero\w*|atheromatous(?: \w+)?"),
    # A rib or clavicle "deformity" is not called a fracture; a vertebral compression is one.
    (("fracture",),
     r"fractur(?:e|es|ed)|(?:vertebral |wedge )?compression(?: deformit(?:y|ies))?|wedge deformit(?:y|ies)"),
    (("hernia",), r"hernia(?:s|tion)?"),
    (("scoliosis",),
     r"(?:levo|dextro)?scolio(?:sis|tic)(?: curvature)?|(?:levo|dextro)curvature|curvature of the(?: \w+)? spine"),
    (("degenerative_change",),
     r"degenerat\w*(?: \w+){0,2}? (?:changes?|disease|disc|spondylosis)|degenerative|osteophyt\w*"
     r"|spondylo(?:sis|tic)(?: changes?)?|arthriti(?:s|c)(?: changes?)?|arthropathy"
     r"|dish|diffuse idiopathic skeletal hyperostosis"),
    (("tortuous_aorta",),
     r"tortu(?:ous|osity)|ectati?c(?: \w+)?|ectasia|unfold(?:ed|ing)(?: of)?(?: the)? aorta"
     r"|(?:dilated|dilatation of the) (?:thoracic )?aorta"),
    (("hilar_enlargement",),
     r"(?:(?:hilar|mediastinal|paratracheal) )?(?:lymph ?adenopathy|adenopathy)"
     r"|enlarged(?: \w+){0,2}? (?:hila|hilum|lymph nodes?)"
     r"|hilar (?:enlargement|prominence|fullness|mass(?:es)?)|(?:prominent|full|bulky) hila"),
    (("support_device",),
     r"(?:endotracheal|tracheostomy|et|ng|og|nasogastric|orogastric|feeding|enteric|chest|gastric"
     r"|dobhoff|dobbhoff|nasoenteric) tubes?|tubes?|catheters?"
     r"|(?:picc|central|venous|arterial|midline|jugular|subclavian|ij|dialysis|port|swan ganz|pulmonary artery)"
     r" lines?|picc|pacemakers?|pacer|aicd|icd|defibrillators?|generator|leads?|electrodes?"
     r"|port a cath|portacath|(?:chest )?port|(?:sternotomy|sternal|surgical|cerclage) (?:wires?|clips?)|wires?"
     r"|(?:surgical |vascular |cholecystectomy |axillary )?clips?|stents?|valve replacement|drains?|hardware"
     r"|(?:surgical |spinal |orthopedic )?(?:fixation|fusion) (?:hardware|rods?|plates?|screws?)|rods?|screws?"
     r"|(?:surgical|orthopedic|fixation|metallic) plates?|devices?|stimulators?|(?:bone |suture )?anchors?|occluders?|arthroplast\w*"
     r"|prosthe(?:sis|ses|tic)(?: \w+){0,2}"
     r"|tip"),  # a "tip" in a chest film report is a line's or a tube's (IU often masks the device's name)
]

_NORMAL = r"(?:normal|within (?:the )?(?:normal )?limits(?: of normal)?|unremarkable|not enlarged)"
_NORMAL_GAP = r"(?: (?!(?:enlarg|large|prominent|increas|widen|abnormal)\w*\b)\w+)"  # no word that says otherwise

# Statements of normality: the observations they name are absent whatever the triggers say.
NORMAL_LEXICON: list[tuple[tuple[str, ...], str]] = [
    (("cardiomegaly", "enlarged_cardiomediastinum"),
     rf"cardiomediastinal (?:silhouette|contours?|shadow)s?{_NORMAL_GAP}{{0,6}}? (?:stable|{_NORMAL})"
     r"|normal cardiomediastinal (?:silhouette|contours?)"),
    (("cardiomegaly",),
     rf"(?:heart|cardiac)(?: size| silhouette| contours?| shadow)?{_NORMAL_GAP}{{0,6}}? {_NORMAL}"
     r"|normal (?:heart|cardiac)(?: size| silhouette| contours?)?"),
    (("enlarged_cardiomediastinum",),
     rf"mediastin\w*(?: silhouette| contours?| width)?{_NORMAL_GAP}{{0,4}}? {_NORMAL}"
     r"|normal mediastin\w*(?: silhouette| contours?)?"),
    (("lung_opacity",), r"lungs?(?: \w+){0,3}? clear|clear lungs?"),
    (("pleural_effusion",),
     r"(?:costophrenic|cp) (?:angles?|sulci|recesses)(?: \w+){0,2}? (?:clear|sharp|preserved|normal)"
     r"|sharp (?:costophrenic|cp) angles?"),
    (("fracture",),
     rf"(?:osseous|bony|skeletal) (?:structures?|thorax|findings?)?{_NORMAL_GAP}{{0,4}}? (?:intact|{_NORMAL})"),
    (("vascular_congestion",), rf"(?:pulmonary )?vascular(?:ity|ture| engorgement){_NORMAL_GAP}{{0,5}}? {_NORMAL}"),
]

# Global "nothing acute" phrases: they name these observations only when negated.
NEGATED_ONLY_LEXICON: list[tuple[tuple[str, ...], str]] = [
    (("fracture",),
     r"(?:acute )?(?:bony|bone|osseous|skeletal)(?: \w+){0,4}? (?:abnormalit(?:y|ies)|findings?|injur(?:y|ies)"
     r"|process|lesions?)"),
    (("lung_opacity", "pleural_effusion", "pneumothorax"),
     r"(?:acute|active) (?:(?!bony|bone|osseous|skeletal)\w+ ){0,3}?"
     r"(?:process|processes|disease|abnormalit(?:y|ies)|findings?|pathology|changes?|infiltrates?)"
     r"|cardiopulmonary (?:process|disease|abnormalit(?:y|ies)|findings?)"),
]

# Trigger phrases: (kind, direction, pattern). Kind None marks a pseudo-trigger that only keeps
# shorter triggers inside it from acting ("no change in the opacity" does not negate the opacity).
TRIGGERS: list[tuple[str | None, str, str]] = [
    (None, "pre",
     r"no (?:significant |interval |definite |appreciable )*"
     r"(?:change|changes|increase|decrease|worsening|improvement)"
     r"|not (?:significantly )?(?:changed|increased|decreased|worsened|improved)"
     r"|without (?:significant |interval )*(?:change|changes)"
     r"|not only|not necessarily|to suggest|to indicate|gram negative"),
    ("uncertain", "post",
     r"(?:cannot|can not|can't|could not|couldn't|not) be (?:entirely |completely |definitely )?(?:excluded|ruled out)"
     r"|not (?:entirely |completely |definitely )?(?:excluded|ruled out)"),
    ("uncertain", "pre",
     r"(?:cannot|can not|can't|could not|couldn't|difficult to) (?:entirely |completely |definitely )?"
     r"(?:exclude|rule out)"),
    ("uncertain", "both", r"versus|vs\.?|\?"),
    ("uncertain", "post", r"(?:is|are|was|were|remains?) (?:also )?(?:possible|suspected|questioned|likely|favored)"),
    ("absent", "post",
     r"(?:is|are|was|were|has been|have been|has|have)? ?"
     r"(?:not (?:well |clearly |definitely |convincingly )?(?:seen|identified|visuali[sz]ed|appreciated|evident"
     r"|present|demonstrated|noted|detected|visible|apparent)"
     r"|resolved|cleared|been removed|removed|absent|no longer \w+)"),
    ("absent", "pre",
     r"(?:interval )?(?:resolution|removal|resolving|clearing) of|resolved"
     r"|(?:no|without) (?:evidence|signs?|findings?) of"),
    ("uncertain", "pre",
     r"may|might|could|possib(?:le|ly|ility(?: of)?)|probabl[ey]|likely|suggest(?:s|ed|ing|ive(?: of)?)?"
     r"|question(?:able)?(?: of)?|concern(?:ing)? (?:for|of)|suspicio(?:us|n) (?:for|of)|suspect(?:ed)?"
     r"|presum(?:ed|ably|ptive)|differential(?: diagnosis)?(?: includes?)?|consider(?:ed|ation of)?"
     r"|borderline|equivocal|indeterminate|uncertain|worrisome for|raises? the possibility(?: of)?"),
    ("absent", "pre",
     r"no|not|without|free of|clear of|negative for|absence of|rather than|unlikely|nor|neither"
     r"|ruled out|rules out|excludes?"),
]

# What ends a trigger's scope inside a sentence.
CLAUSE_BREAK = re.compile(
    r";|\b(?:but|however|although|though|except|whereas|yet|nevertheless|which|aside from|apart from|other than"
    r"|with the exception of)\b|\band (?=(?:the|there|a|an)\b)|(?<=,) (?=there (?:is|are)\b)"
)


# Anatomical structures: (kind, zone, fixed side, plural, pattern). Kinds are resolved to REGIONS
# names by `_region_names`; sided kinds need a side (plural words imply both sides).
ANATOMY_LEXICON: list[tuple[str, str | None, str | None, bool, str]] = [
    ("lung", "lower", "both", True, r"bibasilar(?:ly)?|bibasal(?:ly)?|bibasally"),
    ("apex", None, "both", True, r"biapical(?:ly)?"),
    ("cpa", None, None, True, r"(?:costophrenic|cp) (?:angles|sulci|recesses)"),
    ("cpa", None, None, False, r"(?:costophrenic|cp) (?:angle|sulcus|recess)"),
    ("lung", "lower", None, True, r"(?:lung )?bases"),
    ("lung", "lower", None, False, r"(?:lung )?(?:base|basilar|basal|basally)|infrahilar"),
    ("apex", None, None, True, r"(?:lung )?apices"),
    ("apex", None, None, False, r"(?:lung )?(?:apex|apical|apically)"),
    ("lung", "mid", None, True, r"mid ?lungs|mid ?lung zones"),
    ("lung", "mid", None, False, r"mid ?lung(?: zone| field)?"),
    ("lung", "mid", "left", False, r"lingula|lingular"),
    ("lung", "lower", "left", False, r"retrocardiac"),
    ("lung", None, None, True, r"lungs|lobes|(?:lung )?zones|(?:lung )?fields|hemithoraces"),
    ("lung", None, None, False, r"lung|lobe|zone|(?:lung )?field|hemithorax|suprahilar"),
    ("hilum", None, None, True, r"hila|hilar regions"),
    ("hilum", None, None, False, r"hilum|hilus|hilar|perihilar"),
    ("hemidiaphragm", None, None, True, r"(?:hemi ?)?diaphragms"),
    ("hemidiaphragm", None, None, False, r"(?:hemi ?)?diaphragm(?:atic)?"),
    ("pleura", None, None, False, r"pleura|pleural"),
    ("heart", None, None, False, r"heart|cardiac|cardio\w*|pericardial|atri(?:um|al)|ventric\w+"),
    ("mediastinum", None, None, False, r"mediastinum|mediastinal|paratracheal|superior vena cava|svc"),
    ("aorta", None, None, False, r"aorta|aortic(?: arch| knob)?"),
    ("trachea", None, None, False, r"trachea|tracheal|carina"),
    ("spine", None, None, False,
     r"(?:thoracic |lumbar |thoracolumbar |cervical )?(?:spine|spinal|vertebra\w*)|paraspinal|mid ?thoracic"),
    ("bones", None, None, False,
     r"ribs?|clavicles?|clavicular|humer(?:us|al|i)|shoulders?|bones?|osseous|skeletal|bony(?: thorax)?"
     r"|sternum|sternal|scapula\w*|glenohumeral|acromioclavicular"),
    ("soft_tissue", None, None, False, r"soft tissues?|breasts?|axilla\w*|chest wall|subcutaneous"),
]
SIDED_KINDS = {"lung", "apex", "cpa", "hilum", "hemidiaphragm", "pleura"}
SIDE_WORDS = {"right": "right", "left": "left", "bilateral": "both", "bilaterally": "both", "both": "both"}
ZONE_WORDS = {"upper": "upper", "lower": "lower", "mid": "mid", "middle": "mid"}
MODIFIERS = (r"(?:(?:right|left|bilateral|both|upper|lower|mid|middle|and|or|the"
              r"|lateral|medial|anterior|posterior|inferior|superior)\s+)*")
SIDE_ONLY_RE = re.compile(r"\b(right|left|bilateral|bilaterally|both)(?: sided)?\b")

LUNG_KINDS = frozenset({"lung", "apex", "cpa", "hilum", "pleura", "hemidiaphragm"})
ANY_KIND = frozenset({"lung", "apex", "cpa", "hilum", "pleura", "hemidiaphragm", "heart", "mediastinum", "aorta",
                      "trachea", "spine", "bones", "soft_tissue"})
# Which anatomy a finding may be placed in, and where it goes when the sentence names none.
FINDING_KINDS = {
    "cardiomegaly": frozenset({"heart"}),
    "enlarged_cardiomediastinum": frozenset({"heart", "mediastinum"}),
    "tortuous_aorta": frozenset({"aorta"}),
    "fracture": frozenset({"bones", "spine"}),
    "degenerative_change": frozenset({"spine", "bones"}),
    "scoliosis": frozenset({"spine"}),
    "hernia": frozenset({"hemidiaphragm", "mediastinum"}),
    "hilar_enlargement": frozenset({"hilum", "mediastinum"}),
    "calcification": ANY_KIND,
    "support_device": ANY_KIND,
}
DEFAULT_REGION = {
    "cardiomegaly": "heart", "enlarged_cardiomediastinum": "mediastinum", "tortuous_aorta": "aorta",
    "fracture": "bones", "scoliosis": "spine", "degenerative_change": "spine",
}
# The kind a bare side ("small left effusion") stands for, per finding.
SIDE_ONLY_KIND = {"fracture": "bones", "hilar_enlargement": "hilum", "hernia": None, "support_device": None,
                  "cardiomegaly": None, "enlarged_cardiomediastinum": None, "tortuous_aorta": None,
                  "scoliosis": None, "degenerative_change": None, "calcification": None}
PLEURAL_FINDINGS = {"pleural_effusion"}
MAX_ANATOMY_GAP = 60  # characters between a finding and the anatomy it is placed in

# A sentence that says the study (or a part of it) is normal, beyond the lexicon's normal
# statements: "The cardiomediastinal contours, lungs, pleura ... are normal", "Negative chest".
NORMAL_STATEMENT = re.compile(
    r"(?<!\bnot )\b(?:normal|unremarkable|within (?:the )?normal limits|clear)\b"
    r"|\bnegative (?:chest|study|exam\w*|radiograph\w*|x ray)\b")
