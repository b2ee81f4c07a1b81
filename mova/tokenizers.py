"""Tiny tokenizers trained locally, so tests and toy runs need no downloads.

Both builders are deterministic: the same corpus always gives the same vocabulary, so a tiny
model trained in one process can be reloaded in another with a freshly built tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
LLM_SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, IMAGE_TOKEN)
LLM_VOCAB_SIZE = 2048
BERT_VOCAB_SIZE = 1000
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Same layout as the "chatml" preset in mova.conversation (default system prompt included).
CHATML_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words.",
    "What is shown in the image?",
    "Describe the image in detail.",
    "Describe this picture briefly.",
    "The image shows a cat sitting on a wooden table.",
    "A man is riding a bicycle down a busy street.",
    "Two children are playing with a ball in the park.",
    "There is a red car parked next to a white building.",
    "The sky is blue and there are a few clouds.",
    "A woman is holding an umbrella in the rain.",
    "The dog is running across the green grass.",
    "A plate of food with rice, vegetables and chicken.",
    "A group of people are standing near the train station.",
    "The kitchen has a stove, a sink and a refrigerator.",
    "An airplane is flying over the mountains.",
    "A boat is sailing on the calm lake at sunset.",
    "The living room has a sofa, a lamp and a television.",
    "What color is the car?",
    "What color is the shirt of the man on the left?",
    "How many people are in the picture?",
    "How many apples are on the table?",
    "Is there a dog in the image?",
    "Is the person wearing a hat?",
    "Are there any clouds in the sky?",
    "Where is the cat sitting?",
    "What is the man holding in his hand?",
    "What time of day is it?",
    "What is the weather like in this photo?",
    "Which object is closest to the camera?",
    "What is written on the sign?",
    "Read the text in the image.",
    "What is the title of the document?",
    "What is the date mentioned in the letter?",
    "Who signed the form at the bottom?",
    "What is the total amount on the invoice?",
    "The invoice total is 45 dollars and 20 cents.",
    "The document is a letter from the finance department.",
    "The table lists the names, ages and cities of the employees.",
    "According to the report, sales grew by 12 percent last year.",
    "What is the page number?",
    "The page number is 7.",
    "What is the phone number listed in the header?",
    "The receipt shows three items and a tax line.",
    "What is the highest value in the chart?",
    "Which year had the lowest revenue?",
    "What is the value of the blue bar in 2019?",
    "The line chart shows temperature over twelve months.",
    "The pie chart shows the market share of five companies.",
    "The bar chart compares the population of four countries.",
    "What is the difference between the two largest bars?",
    "The x-axis shows the year and the y-axis shows the price.",
    "What percentage of respondents answered yes?",
    "About 38% of respondents answered yes.",
    "What is the sum of the values for Germany and France?",
    "The red circle is above the blue square.",
    "A green triangle is next to a yellow star.",
    "The purple cube is behind the orange cylinder.",
    "How many red spheres are there?",
    "Is the large metal cube the same color as the small sphere?",
    "What shape is the object to the right of the cylinder?",
    "What is the material of the big object?",
    "The small rubber ball is gray.",
    "Count the number of birds in the tree.",
    "There are five birds in the tree.",
    "Is this a CT scan or an MRI?",
    "This is an axial CT scan of the chest.",
    "The chest X-ray shows no sign of pneumonia.",
    "Which organ is abnormal in this image?",
    "The MRI shows a lesion in the left frontal lobe.",
    "Is there evidence of a fracture?",
    "The ultrasound image shows the liver and the kidney.",
    "What modality was used to take this image?",
    "The pathology slide shows stained tissue cells.",
    "Yes.",
    "No.",
    "Yes, there is.",
    "No, there is not.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "A, B, C",
    "None",
    "none",
    "Please answer yes or no.",
    "Give a short answer.",
    "Provide a one-sentence caption for the provided image.",
    "Reference OCR tokens: STOP, MAIN ST, EXIT.",
    "The model pool lists several vision experts.",
    "Select the most suitable models for the question.",
    "Choose up to three models, separated by commas, or answer none.",
    "This model is good at fine-grained visual details but weak at reading text.",
    "This model is good at object detection and counting.",
    "This model is good at segmentation and object boundaries.",
    "This model is good at reading documents and screenshots.",
    "This model is good at understanding charts and plots.",
    "This model is good at optical character recognition of dense text.",
    "This model is good at biomedical images such as scans and slides.",
    "It is weak at general natural images.",
    "The assistant gives helpful, detailed, and polite answers.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "You are a helpful assistant.",
    "Thank you very much for your help!",
    "I am not sure, but it looks like a tennis racket.",
    "The answer is unknown.",
    "It is a sunny afternoon at the beach.",
    "The street sign says Main Street.",
    "The clock on the wall shows ten past three.",
    "The bottle on the shelf is half empty.",
    "He is wearing a black jacket and blue jeans.",
    "She is reading a book under a tree.",
    "The screenshot shows a settings menu with five options.",
    "The webpage has a search box and a login button.",
    "The poster advertises a concert on Friday night.",
    "Mathematics, physics and chemistry are sciences.",
    "The cafe serves coffee, tea, juice and sandwiches.",
    "Please describe the scene step by step.",
    "First, second, third, fourth, fifth, sixth, seventh, eighth, ninth, tenth.",
    "Zero, one, two, three, four, five, six, seven, eight, nine, ten.",
    "Eleven, twelve, twenty, thirty, forty, fifty, sixty, seventy, eighty, ninety, hundred.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    "January, February, March, April, May, June, July, August.",
    "September, October, November and December.",
    "Left, right, top, bottom, center, front, back, inside, outside.",
    "Big, small, large, tiny, tall, short, long, wide, narrow.",
    "Café, naïve, résumé and jalapeño have accents.",
    "The museum displays ancient pottery, sculptures and paintings.",
    "A giraffe is eating leaves from a tall acacia tree.",
    "Several horses are grazing in a fenced meadow.",
    "The elephant is standing near a muddy river bank.",
    "A surfer rides a huge wave close to the shore.",
    "A skateboarder performs a trick on a concrete ramp.",
    "The baseball player swings the bat at the pitch.",
    "Snow covers the roofs of the small village houses.",
    "A laptop, a keyboard and a computer mouse sit on the desk.",
    "The bathroom has a toilet, a mirror and a shower curtain.",
    "A pizza with cheese, mushrooms and pepperoni slices.",
    "Broccoli, carrots and potatoes are in the bowl.",
    "The motorcycle is parked beside a fire hydrant.",
    "Traffic lights hang above the intersection downtown.",
    "A kite is flying high above the sandy beach.",
    "Passengers are waiting on the platform for the subway.",
    "The zebra has black and white stripes.",
    "The teddy bear is sitting on a pillow.",
    "A vase of sunflowers decorates the windowsill.",
    "The spreadsheet contains quarterly revenue figures.",
    "The histogram shows the distribution of exam scores.",
    "The scatter plot suggests a positive correlation.",
    "Which category has the smallest share?",
    "The median income increased between 2010 and 2020.",
    "Unemployment dropped from 8.5% to 4.2% over the decade.",
    "The legend identifies each colored series.",
    "The table header reads product, quantity, unit price and subtotal.",
    "The signature appears above the printed name.",
    "The memorandum was addressed to the board of directors.",
    "The contract expires on the thirty-first of December.",
    "Patient history includes hypertension and diabetes.",
    "The radiograph reveals a small nodule in the right lung.",
    "The histology image shows inflammatory infiltration.",
    "The brain scan appears normal without hemorrhage.",
    "Mitochondria, nucleus and cytoplasm are parts of a cell.",
    "Dermatology photos show a pigmented skin lesion.",
    "The microscope slide was stained with hematoxylin and eosin.",
    "Vehicles, pedestrians and bicycles share the road.",
    "The refrigerator magnet holds a grocery list.",
    "Lightning strikes during a thunderstorm at night.",
    "Autumn leaves are yellow, orange and crimson.",
    "The keyboard shortcut copies the selected paragraph.",
    "The equation reads x squared plus y squared equals one.",
    "Geometry problems involve angles, polygons and circumference.",
    "The diagram labels the stamen, petal and sepal of a flower.",
    "A satellite photograph shows farmland and highways.",
    "The infographic summarises vaccination statistics.",
    "Handwritten notes are difficult to transcribe accurately.",
    "Wooden chairs surround the rectangular dining table.",
    "Why is the boy smiling?",
    "Who is standing behind the counter?",
    "When was this photograph probably taken?",
    "How would you describe the atmosphere of the scene?",
    "Could this animal be dangerous to humans?",
    "Should the driver stop at this junction?",
    "Explain what makes this image unusual.",
    "Summarize the main findings of the report.",
    "Identify the brand of the sneakers.",
    "Translate the Spanish text into English.",
]

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange", "gray", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "cube", "sphere", "cylinder", "rectangle"]


def _generated_sentences() -> list[str]:
    """Templated sentences covering numbers, colours and shapes (the routing letters of a
    model's pool come with its routing corpus, see ``mova.builders.routing_corpus``)."""
    out = [f"The answer is {n}." for n in range(101)]
    out += [f"In {y} the value was {y % 97}.{y % 10} million." for y in range(1950, 2031)]
    out += [f"The price is ${n}.{(n * 7) % 100:02d} and the share is {n}%." for n in range(60)]
    out += [f"There are {n} objects in the image." for n in range(0, 101, 7)]
    out += [f"The {c} {s} is on the {'left' if i % 2 else 'right'}."
            for i, (c, s) in enumerate((c, s) for c in _COLOURS for s in _SHAPES)]
    return out


CORPUS: list[str] = _SENTENCES + _generated_sentences()


def _training_text(extra_corpus: Iterable[str]) -> list[str]:
    extra = list(extra_corpus)
    for i, text in enumerate(extra):
        if not isinstance(text, str):
            raise ValueError(f"extra_corpus[{i}]: expected a str, got {type(text).__name__}")
    return CORPUS + extra


def build_tiny_llm_tokenizer(extra_corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 2048) with ChatML specials and the image token; encodes any text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLM_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(LLM_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(extra_corpus), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END, IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    hf_tok.chat_template = CHATML_JINJA
    logger.debug("built tiny LLM tokenizer with %d tokens", len(hf_tok))
    return hf_tok


def build_tiny_bert_tokenizer(extra_corpus: Iterable[str] = ()) -> BertTokenizerFast:
    """Uncased WordPiece (vocab ~1000) for the adapter's gate text; adds [CLS] ... [SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = _training_text(extra_corpus)
    # The trainer numbers "##c" pieces in hash-map order, which makes tied merges differ from
    # run to run; registering every "##c" up front, sorted, pins their ids.
    chars = sorted({c for text in texts for c in tok.normalizer.normalize_str(text)} - {" "})
    trainer = trainers.WordPieceTrainer(
        vocab_size=BERT_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(BERT_SPECIAL_TOKENS) + [f"##{c}" for c in chars if not c.isspace()],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    hf_tok = BertTokenizerFast(
        vocab=vocab, do_lower_case=True, strip_accents=True, model_max_length=512
    )
    logger.debug("built tiny BERT tokenizer with %d tokens", len(hf_tok))
    return hf_tok
