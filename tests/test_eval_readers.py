"""Each benchmark reader on a small fixture laid out like the benchmark's own files, and its bad-item handling."""

import base64
import csv
import json
import os

import pytest

from medee_jax.data.errors import BadRecordCounter, BadRecordError
from medee_jax.evaluation.items import ImageRef
from medee_jax.evaluation.prompts import medxpertqa_question
from medee_jax.evaluation.readers import read_mc_jsonl, read_medxpertqa, read_omnimedvqa, read_pmc_vqa, read_text_mc
from medee_jax.evaluation.readers_mmmu import mmmu_items, read_mmmu, read_vlmevalkit_tsv
from medee_jax.evaluation.readers_vqa import read_closed_vqa
from tests.eval_fixtures import png_bytes, write_jsonl, write_png

MXQ_QUESTION = (
    "A 26-year-old man falls from a ladder. Radiographs are shown in Figures A and B. Which surgical step "
    "contributes most to rotatory stability?\nAnswer Choices: (A) Lateral collateral ligament complex repair "
    "(B) Capsular plication (C) Radial head replacement (D) Radial head ORIF (E) Medial collateral ligament "
    "complex reconstruction"
)
MXQ_OPTIONS = ["Lateral collateral ligament complex repair", "Capsular plication", "Radial head replacement",
               "Radial head ORIF", "Medial collateral ligament complex reconstruction"]


def test_mc_jsonl_and_bad_items(tmp_path):
    write_png(tmp_path / "images/a.png", 10)
    rows = [
        {"id": "q1", "question": "Where is the lesion?", "options": {"A": "Left", "B": "Right"}, "answer": "B",
         "images": ["images/a.png"], "subset": "location"},
        {"id": "q2", "question": "Text only?", "options": ["x", "y", "z"], "answer": "C", "images": []},
        {"id": "q3", "question": "Missing image", "options": {"A": "x", "B": "y"}, "answer": "A",
         "images": ["images/missing.png"]},
        {"id": "q4", "question": "No options", "options": {}, "answer": "A"},
        {"id": "q5", "question": "Bad answer", "options": {"A": "x", "B": "y"}, "answer": "D"},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    with pytest.raises(BadRecordError) as e:
        read_mc_jsonl(path)
    assert f"{path}:3" in str(e.value) and "missing_image" in str(e.value)
    counter = BadRecordCounter()
    items = read_mc_jsonl(path, on_bad_record="skip", counter=counter)
    assert [i.id for i in items] == ["q1", "q2"]
    assert items[0].options == ("Left", "Right") and items[0].answer == "B" and items[0].subset == "location"
    assert items[0].images == (ImageRef(path=str(tmp_path / "images/a.png")),)
    assert items[0].source == f"{path}:1" and items[1].answer == "C" and items[1].images == ()
    assert dict(counter.counts) == {"missing_image": 1, "no_options": 1, "answer_not_in_options": 1}


def test_medxpertqa_both_layouts(tmp_path):
    for name in ("MM-0-a.jpeg", "MM-0-b.jpeg", "MM-1-a.png"):
        write_png(tmp_path / "images" / name, 50)
    github = {"id": "MM-0", "question": MXQ_QUESTION,
              "options": [{"letter": L, "content": t} for L, t in zip("ABCDE", MXQ_OPTIONS)], "label": ["A"],
              "images": [{"image_path": "MM-0-a.jpeg"}, {"image_path": "MM-0-b.jpeg"}], "medical_task": "Treatment",
              "body_system": "Skeletal", "question_type": "Reasoning"}
    hub = {"id": "MM-1", "question": "Which approach?\nAnswer Choices: (A) Lateral (B) Inferior (C) Medial "
           "(D) Superior (E) Oblique", "options": dict(zip("ABCDE", ["Lateral", "Inferior", "Medial", "Superior",
                                                                      "Oblique"])),
           "label": "D", "images": ["MM-1-a.png"], "medical_task": "Basic Science", "body_system": "Reproductive",
           "question_type": "Understanding"}
    no_options = {"id": "MM-2", "question": "Stem?\nAnswer Choices: (A) one (B) two", "label": ["B"], "images": [],
                  "question_type": "Reasoning"}
    path = write_jsonl(tmp_path / "medxpertqa_mm_input.jsonl", [github, hub, no_options])
    items = read_medxpertqa(path)
    assert [i.subset for i in items] == ["Reasoning", "Understanding", "Reasoning"]
    assert items[0].options == tuple(MXQ_OPTIONS) and items[0].answer == "A"
    assert [im.path for im in items[0].images] == [str(tmp_path / "images/MM-0-a.jpeg"),
                                                    str(tmp_path / "images/MM-0-b.jpeg")]
    assert items[1].answer == "D" and items[2].options == ("one", "two")
    assert medxpertqa_question(items[0]) == MXQ_QUESTION  # the choices are written back verbatim

    mismatch = dict(hub, id="MM-3", options={"A": "Lateral", "B": "Other", "C": "Medial", "D": "Superior",
                                             "E": "Oblique"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [mismatch])
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:1: .*differ from the choices"):
        read_medxpertqa(bad, media_root=str(tmp_path / "images"))


def test_text_mc_medqa_and_medbullets(tmp_path):
    medqa = write_jsonl(tmp_path / "medqa_test.jsonl", [
        {"question": "A 67-year-old man ...", "answer": "Cross-linking of DNA",
         "options": {"A": "Inhibition of proteasome", "B": "Hyperstabilization of microtubules",
                     "C": "Generation of free radicals", "D": "Cross-linking of DNA"},
         "meta_info": "step1", "answer_idx": "D"}])
    items = read_text_mc(medqa)
    assert items[0].answer == "D" and items[0].benchmark == "medqa" and items[0].subset == "step1"
    assert items[0].images == () and items[0].id == "medqa_test-1"

    path = tmp_path / "medbullets_op5.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "opa", "opb", "opc", "opd", "ope", "answer_idx", "answer", "explanation"])
        w.writerow(["A 34-year-old woman,\nwith a multi-line stem", "a", "b", "c", "d", "e", "C", "c", "why"])
        w.writerow(["Second", "a", "b", "c", "d", "e", "", "e", "text answer only"])
    items = read_text_mc(path)
    assert [i.answer for i in items] == ["C", "E"] and items[0].options == ("a", "b", "c", "d", "e")
    assert items[0].source.endswith(":2") and items[1].source.endswith(":4")  # the first row spans two lines


def test_pmc_vqa_csv(tmp_path):
    write_png(tmp_path / "images/PMC1064097_F1.jpg", 70)
    path = tmp_path / "test_clean.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
                    "Answer_label"])
        w.writerow(["PMC1064097_F1.jpg", "What is the uptake pattern in the breast?", "Focal uptake pattern",
                    "A:Diffuse uptake pattern", " B:Focal uptake pattern", "C:No uptake pattern",
                    "D:Cannot determine from the information given", "B"])
        w.writerow(["PMC1064097_F1.jpg", "No label column value", "B:Focal uptake pattern",
                    "A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake pattern", "D:Other", ""])
    items = read_pmc_vqa(path)
    assert items[0].options == ("Diffuse uptake pattern", "Focal uptake pattern", "No uptake pattern",
                                "Cannot determine from the information given")
    assert [i.answer for i in items] == ["B", "B"]
    assert items[0].images[0].path == str(tmp_path / "images/PMC1064097_F1.jpg")


def test_omnimedvqa_answer_as_text(tmp_path):
    root = tmp_path / "OmniMedVQA"
    write_png(root / "Images/ACRIMA/Im001.png", 90)
    qa = root / "QA_information/Open-access"
    qa.mkdir(parents=True)
    rows = [
        {"dataset": "ACRIMA", "question_id": "ACRIMA_0001", "question_type": "Disease Diagnosis",
         "question": "Is there glaucoma in this fundus image?", "gt_answer": "No, It's normal.",
         "image_path": "Images/ACRIMA/Im001.png", "option_A": "Yes, it's glaucoma.", "option_B": "No, It's normal.",
         "modality_type": "Fundus Photography"},
        {"dataset": "ACRIMA", "question_id": "ACRIMA_0002", "question_type": "Modality Recognition",
         "question": "What modality?", "gt_answer": "CT", "image_path": "Images/ACRIMA/Im001.png",
         "option_A": "Fundus photography", "option_B": "MR", "option_C": "X-ray", "option_D": "Dermoscopy",
         "modality_type": "Fundus Photography"},
    ]
    (qa / "ACRIMA.json").write_text(json.dumps(rows))
    counter = BadRecordCounter()
    items = read_omnimedvqa(qa, on_bad_record="skip", counter=counter)
    assert len(items) == 1 and items[0].answer == "B" and items[0].options == ("Yes, it's glaucoma.", "No, It's normal.")
    assert items[0].subset == "Disease Diagnosis" and items[0].images[0].path == str(root / "Images/ACRIMA/Im001.png")
    assert counter["answer_not_in_options"] == 1  # "CT" is none of the options


def test_mmmu_rows_and_pro(tmp_path):
    write_png(tmp_path / "img/v1.png", 1)
    write_png(tmp_path / "img/v2.png", 2)
    rows = [
        {"id": "validation_Clinical_Medicine_1", "question": "<image 1> Which lesion is shown, compared to <image 2>?",
         "options": "['Abscess', 'Cyst', '<image 2> again']", "explanation": "", "image_1": "img/v1.png",
         "image_2": "img/v2.png", "image_3": None, "img_type": "['Photographs']", "answer": "B",
         "topic_difficulty": "Medium", "question_type": "multiple-choice", "subfield": "Surgery"},
        {"id": "validation_Clinical_Medicine_2", "question": "Open?", "options": "[]", "image_1": "img/v1.png",
         "answer": "12", "question_type": "open"},
        {"id": "validation_Art_1", "question": "<image 1> Art?", "options": "['a', 'b']", "image_1": "img/v1.png",
         "answer": "A", "question_type": "multiple-choice"},
        {"id": "validation_Pharmacy_3", "question": "Dose?", "options": "['1 mg', '2 mg']",
         "image_1": {"bytes": base64.b64encode(png_bytes(3)).decode(), "path": None}, "answer": "A",
         "question_type": "multiple-choice"},
    ]
    counter = BadRecordCounter()
    items = read_mmmu(write_jsonl(tmp_path / "mmmu.jsonl", rows), subjects=["Clinical_Medicine", "Pharmacy"],
                      counter=counter)
    first = items[0]
    assert first.question == "<image> Which lesion is shown, compared to <image>?"
    assert first.options == ("Abscess", "Cyst", "<image> again") and first.subset == "Clinical_Medicine"
    assert [im.path for im in first.images] == [str(tmp_path / "img/v1.png"), str(tmp_path / "img/v2.png"),
                                                str(tmp_path / "img/v2.png")]
    assert items[1].question == "<image>Dose?" and items[1].images[0].data == png_bytes(3)  # unreferenced first
    assert dict(counter.counts) == {"not_multiple_choice": 1, "other_subject": 1}

    pro = [{"id": "test_Public_Health_7", "question": "Which rate?", "options": str([f"o{i}" for i in range(10)]),
            "answer": "J", "subject": "Public_Health"},
           {"id": "test_Pharmacy_9", "image": "img/v1.png", "options": str(["x", "y", "z"]), "answer": "C",
            "subject": "Pharmacy"}]
    pro_items = mmmu_items(pro, name="mmmu_pro_rows", pro=True, media_root=str(tmp_path))
    assert len(pro_items[0].options) == 10 and pro_items[0].answer == "J" and pro_items[0].subset == "Public_Health"
    assert pro_items[1].question.startswith("<image>Answer the following") and pro_items[1].images[0].path == \
        str(tmp_path / "img/v1.png")
    assert pro_items[0].source == "mmmu_pro_rows:1"


def test_vlmevalkit_tsv(tmp_path):
    b1, b2 = base64.b64encode(png_bytes(5)).decode(), base64.b64encode(png_bytes(6)).decode()
    path = tmp_path / "MMMU_DEV_VAL.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "image", "category", "hint", "split"])
        w.writerow(["10", "Which finding?", "Mass", "Cyst", "Normal", "", "C", b1, "Clinical_Medicine", "", "dev"])
        w.writerow(["11", "Same image, new question", "yes", "no", "", "", "A", "10", "Clinical_Medicine",
                    "Look closely", "dev"])
        w.writerow(["12", "Compare <image 2> with <image 1>", "left", "right", "", "", "B", str([b1, b2]),
                    "Pharmacy", "", "dev"])
        w.writerow(["13", "Broken image", "x", "y", "", "", "A", "!!notbase64!!" * 10, "Pharmacy", "", "dev"])
    counter = BadRecordCounter()
    items = read_vlmevalkit_tsv(path, on_bad_record="skip", counter=counter)
    assert [i.id for i in items] == ["10", "11", "12"]
    assert items[0].options == ("Mass", "Cyst", "Normal") and items[0].images[0].data == png_bytes(5)
    assert items[1].images[0].data == png_bytes(5) and items[1].question == "Hint: Look closely\nSame image, new question"
    assert items[2].question == "Compare <image> with <image>"
    assert [im.data for im in items[2].images] == [png_bytes(6), png_bytes(5)]
    assert counter["corrupt_image"] == 1


def test_closed_vqa_slake_vqarad_hf_rows(tmp_path):
    write_png(tmp_path / "imgs/xmlab102/source.jpg", 20)
    slake = [
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Does the picture contain liver?",
         "answer": "No", "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "CLOSED",
         "base_type": "vqa", "triple": ["vhead", "_", "_"], "qid": 11938, "content_type": "Organ"},
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "What modality is used?", "answer": "CT",
         "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN", "qid": 11934},
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Which organ is abnormal, heart or lung?",
         "answer": "Heart", "q_lang": "en", "modality": "X-Ray", "answer_type": "CLOSED", "qid": 11971},
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "图片里有肝脏吗?", "answer": "是",
         "q_lang": "zh", "modality": "CT", "answer_type": "CLOSED", "qid": 1},
    ]
    (tmp_path / "test.json").write_text(json.dumps(slake, ensure_ascii=False))
    counter = BadRecordCounter()
    items = read_closed_vqa(tmp_path / "test.json", counter=counter)
    assert len(items) == 1 and items[0].options == ("Yes", "No") and items[0].answer == "B"
    assert items[0].subset == "CT" and items[0].benchmark == "slake" and items[0].id == "11938"
    assert counter["not_multiple_choice"] == 3  # open, closed-but-not-yes/no, and the Chinese "是"

    write_png(tmp_path / "VQA_RAD Image Folder/synpic54610.jpg", 30)
    rad = [{"qid": 1, "image_name": "synpic54610.jpg", "image_case_url": "https://example/x", "image_organ": "HEAD",
            "answer": "Yes", "answer_type": "CLOSED", "question_type": "PRES", "question": "Are regions of the brain "
            "infarcted?", "phrase_type": "freeform"}]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rad))
    items = read_closed_vqa(tmp_path / "VQA_RAD Dataset Public.json")
    assert items[0].answer == "A" and items[0].subset == "HEAD" and items[0].benchmark == "vqa_rad"
    assert items[0].images[0].path == str(tmp_path / "VQA_RAD Image Folder/synpic54610.jpg")

    hf = [{"image": {"bytes": base64.b64encode(png_bytes(40)).decode(), "path": "x.jpg"}, "question": "is this "
           "a lung?", "answer": "yes"},
          {"image": {"bytes": base64.b64encode(png_bytes(41)).decode(), "path": "y.jpg"}, "question": "what is it?",
           "answer": "a cell"}]
    items = read_closed_vqa(write_jsonl(tmp_path / "pathvqa_test.jsonl", hf), dataset="pathvqa")
    assert len(items) == 1 and items[0].benchmark == "pathvqa" and items[0].images[0].data == png_bytes(40)


def test_missing_image_file_is_located(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"img_name": "gone.jpg", "question": "Is it?", "answer": "Yes", "q_lang": "en",
                                 "answer_type": "CLOSED", "qid": 5}]))
    with pytest.raises(BadRecordError) as e:
        read_closed_vqa(path)
    assert str(e.value).startswith(f"{path}:1: bad record (missing_image)")
    assert os.path.join("imgs", "gone.jpg") in str(e.value)
