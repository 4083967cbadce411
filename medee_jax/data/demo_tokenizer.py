"""A small Qwen2.5-VL-shaped tokenizer, trained offline, for tests and the offline demo (and its InternVL3 "-hf"
flavour).

`build_demo_tokenizer(out_dir)` trains a byte-level BPE (the Qwen2 pre-tokenizer: NFC, the Qwen split regex,
byte-level) on a built-in corpus of medical-style English, appends Qwen2.5-VL's added tokens in Qwen's order
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|object_ref_start|>` … `<|vision_start|>`, `<|vision_end|>`,
`<|vision_pad|>`, `<|image_pad|>`, `<|video_pad|>` as special tokens; the tool/FIM tokens and `<think>`,
`</think>` as normal added tokens), and writes tokenizer.json + tokenizer_config.json with a Qwen2.5-VL-style chat
template, so `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it without a network. The output is the
same bytes on every run.

`build_demo_tokenizer(out_dir, flavour="internvl")` writes the same vocabulary plus InternVL3's added tokens
(`<img>`, `</img>`, `<IMG_CONTEXT>`, `<quad>` … `</box>`, `<video>`, special, after Qwen's; the named ones as
`start_image_token`, `end_image_token`, `context_image_token`, `video_token`) and InternVL3's "-hf" chat template
(no default system prompt; an image part renders `<IMG_CONTEXT>\n`).

The ids differ from the real Qwen vocabulary (151643…); code must look special tokens up by their text.
"""

from __future__ import annotations

import json
import os

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Size of the learned byte-level BPE vocabulary (256 byte symbols + merges); the added tokens come after it.
BPE_VOCAB_SIZE = 3000

# Qwen2's pre-tokenization regex (contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's added tokens in id order: (text, special).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<think>", False),
    ("</think>", False),
)

# The parts of a turn both flavours render alike: the header, the assistant's text parts (as a generation span),
# then the other roles' parts loop (each flavour writes its own image / video / text branches) and the closing.
_TURN_OPEN = (
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endgeneration -%}{%- else -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
)
_TURN_CLOSE = (
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2.5-VL's chat rendering: a default system prompt when the conversation does not start with one; each image
# part → <|vision_start|><|image_pad|><|vision_end|> (video parts likewise with <|video_pad|>); content may be a
# string or a list of {type: image|video|text} parts. Assistant content is wrapped in {% generation %} so that
# `return_assistant_tokens_mask=True` works with this template (the real Qwen template lacks it; medee_jax does
# not rely on it).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    + _TURN_OPEN +
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    + _TURN_CLOSE
)

# InternVL3's added tokens after Qwen's (transformers' InternVL conversion adds them in this order).
INTERNVL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = tuple(
    (t, True) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                        "<video>"))
# Named special tokens of InternVL3's "-hf" tokenizer (what transformers' InternVLProcessor reads).
INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

# InternVL3 "-hf" chat rendering: `<|im_start|>role\n...<|im_end|>\n` turns, no default system prompt, each image
# part -> `<IMG_CONTEXT>\n` (the processor expands it to <img> + <IMG_CONTEXT> x 256 per tile + </img>).
INTERNVL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + _TURN_OPEN +
    "{%- if part['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    + _TURN_CLOSE
)

FLAVOURS = ("qwen2_5_vl", "internvl")

_PROSE = """\
A 45-year-old man presents to the emergency department with acute chest pain radiating to the left arm.
The electrocardiogram shows ST-segment elevation in leads II, III and aVF, consistent with an inferior myocardial infarction.
A 32-year-old woman reports fatigue, weight gain, cold intolerance and constipation over the past six months.
Laboratory studies show an elevated thyroid-stimulating hormone and a low free thyroxine level.
The chest radiograph demonstrates a right lower lobe consolidation with an air bronchogram.
Axial computed tomography of the abdomen reveals a hypodense lesion in the right hepatic lobe measuring 3.2 cm.
Magnetic resonance imaging of the brain shows a ring-enhancing lesion with surrounding vasogenic edema.
The patient was started on intravenous ceftriaxone and azithromycin for community-acquired pneumonia.
Histopathology shows nests of atypical squamous cells with keratin pearls and intercellular bridges.
The biopsy specimen demonstrates noncaseating granulomas, suggestive of sarcoidosis.
Ultrasound of the gallbladder shows multiple echogenic foci with posterior acoustic shadowing.
A 68-year-old smoker has a persistent cough, hemoptysis and an unintentional weight loss of 8 kg.
Physical examination reveals jugular venous distension, bilateral pitting edema and an S3 gallop.
The fundoscopic examination shows cotton-wool spots, flame hemorrhages and arteriovenous nicking.
Blood pressure is 165/95 mmHg, heart rate 112/min, respiratory rate 24/min and temperature 38.6 C.
Serum creatinine increased from 0.9 mg/dL to 2.4 mg/dL within 48 hours after contrast administration.
The dermatoscopic image shows an asymmetric pigmented lesion with irregular borders and multiple colors.
Colonoscopy reveals a friable, ulcerated mass in the sigmoid colon; biopsies confirm adenocarcinoma.
The MRI of the knee shows a complete tear of the anterior cruciate ligament with bone marrow edema.
Echocardiography demonstrates a reduced left ventricular ejection fraction of 30% with global hypokinesis.
A child with a barking cough, inspiratory stridor and a steeple sign on the neck radiograph most likely has croup.
The peripheral blood smear shows schistocytes and thrombocytopenia, raising concern for microangiopathic hemolysis.
Cerebrospinal fluid analysis reveals neutrophilic pleocytosis, low glucose and elevated protein.
The skin biopsy shows subepidermal blisters with linear IgG deposition along the basement membrane.
Mammography shows a spiculated mass with pleomorphic microcalcifications in the upper outer quadrant.
Non-contrast head CT shows a hyperdense crescent-shaped collection along the right convexity.
The abdominal radiograph shows dilated small bowel loops with multiple air-fluid levels.
Renal ultrasound reveals bilateral enlarged kidneys with numerous cysts of varying size.
Arterial blood gas: pH 7.29, PaCO2 55 mmHg, HCO3 26 mEq/L, indicating acute respiratory acidosis.
She was diagnosed with type 2 diabetes mellitus and started on metformin 500 mg twice daily.
The most appropriate next step in management is urgent cardiac catheterization.
Which of the following is the most likely diagnosis? Which of the following best explains these findings?
What is the most likely underlying mechanism? What is the best initial test? What is the next best step?
Answer: B. The answer is C. Correct option: A. Options: A) pneumothorax B) pleural effusion C) atelectasis.
Let me think step by step. First, identify the key findings. Second, consider the differential diagnosis.
The image shows a well-circumscribed, round opacity in the left upper lobe without calcification.
Given the history and the imaging findings, the most likely diagnosis is pulmonary embolism.
Therefore, the correct answer is D, because the findings are characteristic of aortic dissection.
This option is incorrect because the lesion lacks the typical features of a benign hemangioma.
The radiologist noted cardiomegaly, cephalization of pulmonary vessels and Kerley B lines.
Differential diagnosis includes lymphoma, metastatic disease, tuberculosis and fungal infection.
Treatment options include surgical resection, radiotherapy, chemotherapy and targeted therapy.
The pathology slide, stained with hematoxylin and eosin, shows Reed-Sternberg cells.
Immunohistochemistry is positive for CD15 and CD30 and negative for CD20 and CD45.
The fracture line extends through the distal radius metaphysis with dorsal angulation.
Retinal photography shows neovascularization at the disc and vitreous hemorrhage.
The histology shows crypt abscesses, goblet cell depletion and continuous mucosal inflammation.
Pulmonary function tests show an FEV1/FVC ratio of 0.62 that does not improve after bronchodilator.
The patient has a history of hypertension, hyperlipidemia, chronic kidney disease and atrial fibrillation.
Medications include lisinopril, atorvastatin, warfarin, metoprolol and furosemide.
On auscultation there is a harsh crescendo-decrescendo systolic murmur at the right upper sternal border.
The lesion is hyperintense on T2-weighted images and shows restricted diffusion on DWI.
Contrast-enhanced CT shows arterial phase hyperenhancement with washout in the portal venous phase.
A 25-year-old woman has a malar rash, photosensitivity, arthralgia and oral ulcers.
Anti-double-stranded DNA antibodies and antinuclear antibodies are positive; complement levels are low.
The x-ray of the hand shows periarticular osteopenia, joint space narrowing and marginal erosions.
A newborn has bilious vomiting, and the upper gastrointestinal series shows a corkscrew duodenum.
PET-CT reveals hypermetabolic mediastinal lymph nodes with a maximum standardized uptake value of 12.
Doppler ultrasound shows a noncompressible left femoral vein with absent flow, confirming deep vein thrombosis.
The cytology shows cells with nuclear grooves, pseudoinclusions and psammoma bodies.
Evaluate the image carefully and choose the single best answer from the options provided.
Please explain your reasoning before giving the final answer.
The findings are nonspecific; correlation with clinical history and laboratory results is recommended.
No acute intracranial abnormality. No pneumothorax. Heart size is normal. Lungs are clear.
Impression: findings most consistent with acute appendicitis with a periappendiceal fluid collection.
Glossary. Tachycardia: a resting heart rate above one hundred beats per minute. Bradycardia: a slow heart rate.
Hepatomegaly means an enlarged liver; splenomegaly means an enlarged spleen; nephromegaly, an enlarged kidney.
Anatomy: cerebellum, hippocampus, thalamus, hypothalamus, pituitary, medulla, pons, cortex, ventricle, meninges.
Thorax: trachea, bronchus, bronchiole, alveolus, pleura, diaphragm, mediastinum, pericardium, myocardium, septum.
Abdomen: esophagus, stomach, duodenum, jejunum, ileum, cecum, appendix, rectum, peritoneum, mesentery, omentum.
Pelvis: uterus, cervix, ovaries, fallopian tubes, urethra, ureter, testis, epididymis, seminal vesicles.
Skeleton: clavicle, scapula, humerus, ulna, carpal, metacarpal, phalanx, pelvis, acetabulum, tibia, fibula, calcaneus.
Vessels: carotid, vertebral, subclavian, brachial, radial, mesenteric, iliac, popliteal, saphenous, jugular, portal.
Drugs: amoxicillin, vancomycin, piperacillin, meropenem, doxycycline, ciprofloxacin, metronidazole, fluconazole.
More drugs: heparin, enoxaparin, apixaban, rivaroxaban, clopidogrel, aspirin, nitroglycerin, amiodarone, digoxin.
Endocrine drugs: insulin glargine, levothyroxine, methimazole, propylthiouracil, hydrocortisone, dexamethasone.
Psychiatric drugs: sertraline, fluoxetine, lithium, haloperidol, olanzapine, clozapine, lorazepam, buspirone.
Oncology: cisplatin, doxorubicin, cyclophosphamide, vincristine, methotrexate, trastuzumab, rituximab, imatinib.
Procedures: thoracentesis, paracentesis, lumbar puncture, bronchoscopy, laparoscopy, cholecystectomy, craniotomy.
Signs: clubbing, cyanosis, pallor, icterus, petechiae, purpura, ecchymosis, crepitus, rebound tenderness, guarding.
Symptoms: anorexia, nausea, vomiting, hematemesis, melena, hematochezia, dysuria, polyuria, nocturia, orthopnea.
Infections: staphylococcus, streptococcus, pseudomonas, klebsiella, escherichia, salmonella, listeria, candida.
Viruses: influenza, hepatitis, cytomegalovirus, herpes simplex, varicella zoster, parvovirus, rotavirus, measles.
Genetics: autosomal dominant, autosomal recessive, mitochondrial inheritance, trinucleotide repeat, mosaicism.
Immunology: neutrophils, eosinophils, basophils, lymphocytes, monocytes, macrophages, plasma cells, cytokines.
Biochemistry: glycolysis, gluconeogenesis, ketogenesis, lipolysis, urea cycle, oxidative phosphorylation.
Physiology: preload, afterload, contractility, compliance, ventilation, perfusion, diffusion, filtration.
Pathology: necrosis, apoptosis, hyperplasia, metaplasia, dysplasia, neoplasia, fibrosis, amyloidosis, gangrene.
Radiology terms: opacity, lucency, attenuation, enhancement, hyperechoic, anechoic, isointense, hypointense.
Descriptors: lobulated, infiltrative, heterogeneous, homogeneous, multiloculated, exophytic, cavitary, miliary.
Pediatrics: intussusception, pyloric stenosis, Kawasaki disease, bronchiolitis, epiglottitis, Wilms tumor.
Obstetrics: preeclampsia, eclampsia, placenta previa, placental abruption, ectopic pregnancy, gestational diabetes.
Neurology: aphasia, ataxia, dysarthria, hemiparesis, nystagmus, ptosis, diplopia, vertigo, tremor, rigidity, chorea.
Ophthalmology: glaucoma, cataract, uveitis, keratitis, papilledema, retinoblastoma, macular degeneration.
Dermatology: psoriasis, eczema, vitiligo, urticaria, pemphigus, impetigo, cellulitis, keloid, seborrheic keratosis.
Hematology: anemia, polycythemia, leukemia, myeloma, hemophilia, thalassemia, spherocytosis, neutropenia.
Nephrology: glomerulonephritis, nephrotic syndrome, pyelonephritis, hydronephrosis, renal tubular acidosis.
Gastroenterology: achalasia, gastritis, peptic ulcer, diverticulitis, cirrhosis, cholangitis, celiac disease.
Cardiology: angina, pericarditis, cardiomyopathy, tamponade, endocarditis, bradyarrhythmia, tachyarrhythmia.
Pulmonology: asthma, emphysema, bronchiectasis, pneumoconiosis, mesothelioma, sarcoidosis, cystic fibrosis.
Rheumatology: gout, pseudogout, vasculitis, scleroderma, dermatomyositis, polymyalgia rheumatica, spondylitis.
Urology: cystitis, prostatitis, urolithiasis, varicocele, hydrocele, torsion, cryptorchidism, hypospadias.
Orthopedics: osteomyelitis, osteoporosis, osteoarthritis, spondylolisthesis, scoliosis, tendinopathy, bursitis.
Emergency: anaphylaxis, hypovolemic shock, cardiogenic shock, tension pneumothorax, status epilepticus, overdose.
Laboratory: hemoglobin, hematocrit, platelets, leukocytes, sodium, potassium, chloride, bicarbonate, calcium.
More laboratory values: albumin, bilirubin, alkaline phosphatase, aminotransferases, lipase, troponin, lactate.
Statistics: sensitivity, specificity, positive predictive value, likelihood ratio, prevalence, incidence, odds.
The clinician should weigh the benefits and harms, discuss the options, and document informed consent.
Follow-up imaging in three months is advised to assess for interval change in size or morphology.
Surgical consultation was obtained; the patient underwent an uncomplicated laparoscopic appendectomy.
The pathologist described sheets of monotonous round blue cells with scant cytoplasm.
Microscopy shows branching septate hyphae at acute angles invading the vessel walls.
Gram stain reveals gram-positive cocci in clusters; cultures grew methicillin-resistant organisms.
Wearing a mask, washing hands, and vaccination reduce transmission of respiratory pathogens.
"""

_PATIENTS = ("man", "woman", "boy", "girl", "infant", "patient", "farmer", "nurse", "athlete", "teacher")
_COMPLAINTS = (
    "fever", "headache", "abdominal pain", "dyspnea", "palpitations", "syncope", "jaundice", "hematuria",
    "dysphagia", "back pain", "joint swelling", "vision loss", "rash", "seizures", "diarrhea", "night sweats",
    "hoarseness", "tinnitus", "weakness", "numbness",
)
_MODALITIES = (
    "chest radiograph", "CT scan", "MRI", "ultrasound", "biopsy", "blood smear", "angiogram", "endoscopy",
    "bone scan", "mammogram", "fundus photograph", "histology slide",
)
_FINDINGS = (
    "a mass", "a nodule", "an effusion", "a fracture", "an abscess", "a hemorrhage", "a cyst", "an infarct",
    "calcifications", "lymphadenopathy", "thickening", "stenosis", "an aneurysm", "a thrombus", "edema",
    "atrophy",
)
_SITES = (
    "the right lung", "the left kidney", "the liver", "the pancreas", "the spleen", "the thyroid", "the femur",
    "the spine", "the aorta", "the frontal lobe", "the bladder", "the prostate", "the ovary", "the retina",
)
_DIAGNOSES = (
    "pneumonia", "tuberculosis", "sarcoidosis", "lymphoma", "melanoma", "osteosarcoma", "glioblastoma",
    "cholecystitis", "pancreatitis", "nephrolithiasis", "hepatocellular carcinoma", "multiple sclerosis",
    "rheumatoid arthritis", "Crohn disease", "endocarditis", "meningitis", "hypothyroidism", "sepsis",
)


_CHAT = """\
system
You are a helpful assistant.
user
assistant
You are a helpful medical assistant. Think through the case, then give the answer.
"""


def demo_corpus() -> list[str]:
    """The built-in training text: fixed prose plus templated case vignettes and multiple-choice lines."""
    lines = [line for line in _PROSE.splitlines() if line.strip()]
    lines += [line for line in _CHAT.splitlines() if line.strip()] * 20
    n = 0
    for i, patient in enumerate(_PATIENTS):
        for j, complaint in enumerate(_COMPLAINTS):
            modality = _MODALITIES[(i + j) % len(_MODALITIES)]
            finding = _FINDINGS[(3 * i + j) % len(_FINDINGS)]
            site = _SITES[(i + 5 * j) % len(_SITES)]
            diagnosis = _DIAGNOSES[(7 * i + j) % len(_DIAGNOSES)]
            age = 18 + (i * 13 + j * 7) % 70
            lines.append(
                f"A {age}-year-old {patient} presents with {complaint} for {2 + n % 11} days. "
                f"The {modality} shows {finding} in {site}."
            )
            options = [_DIAGNOSES[(7 * i + j + k) % len(_DIAGNOSES)] for k in range(4)]
            lines.append(
                "Which is the most likely diagnosis? "
                + " ".join(f"{letter}. {option}" for letter, option in zip("ABCD", options))
            )
            lines.append(
                f"<think>The key finding is {finding} in {site} on the {modality}, together with {complaint}. "
                f"This pattern favors {diagnosis}.</think> The answer is A. {diagnosis.capitalize()}."
            )
            n += 1
    return lines


def _added_tokens(flavour: str) -> tuple[tuple[str, bool], ...]:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown demo tokenizer flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
    return ADDED_TOKENS + (INTERNVL_ADDED_TOKENS if flavour == "internvl" else ())


def _train_tokenizer(flavour: str = "qwen2_5_vl") -> Tokenizer:
    tokenizer = Tokenizer(
        models.BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(demo_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(
            f"demo corpus too small: learned {tokenizer.get_vocab_size()} tokens, wanted {BPE_VOCAB_SIZE}"
        )
    for text, special in _added_tokens(flavour):
        token = AddedToken(text, special=special, normalized=not special, single_word=False, lstrip=False,
                           rstrip=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer, flavour: str = "qwen2_5_vl") -> dict:
    added = {}
    for text, special in _added_tokens(flavour):
        added[str(tokenizer.token_to_id(text))] = {
            "content": text,
            "lstrip": False,
            "normalized": not special,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": INTERNVL_CHAT_TEMPLATE if flavour == "internvl" else CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": (dict(INTERNVL_NAMED_TOKENS) if flavour == "internvl" else
                                 [text for text, special in _added_tokens(flavour)[1:] if special]),
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_demo_tokenizer(out_dir: str | os.PathLike, flavour: str = "qwen2_5_vl") -> dict[str, int]:
    """Writes tokenizer.json and tokenizer_config.json into out_dir; returns {added token text: id}.
    ``flavour``: "qwen2_5_vl" (Qwen2.5-VL's added tokens and chat template) or "internvl" (see the module doc)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = _train_tokenizer(flavour)
    files = {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(_tokenizer_config(tokenizer, flavour), indent=2, ensure_ascii=False),
    }
    for name, text in files.items():
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(out_dir, name))
    return {text: tokenizer.token_to_id(text) for text, _ in _added_tokens(flavour)}


if __name__ == "__main__":
    import sys

    ids = build_demo_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "demo_tokenizer")
    print(json.dumps(ids, indent=2))
