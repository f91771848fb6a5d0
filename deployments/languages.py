"""The languages Whisper models know, and normalising what clients send to their codes.

Clients send `zh-CN`, `zh_TW`, `ZH`, `cmn`, `Mandarin` or `chinese` where the models know `zh`;
an unknown code must be a clear 400 naming `language`, not a model app's traceback. Standard
library only: every env imports it (through the contract).
"""

from __future__ import annotations

from typing import Dict

WHISPER_LANGUAGES: Dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu",
    "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani",
    "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian", "br": "breton",
    "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian",
    "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician",
    "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian",
    "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic",
    "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese", "ht": "haitian creole",
    "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit",
    "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa",
    "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
"""Code -> English name: the 100 languages of Whisper large-v3's tokenizer (openai/whisper's
`tokenizer.LANGUAGES`, MIT; the same list as transformers' and faster-whisper's)."""

_ALIASES: Dict[str, str] = {
    # openai/whisper's other names (TO_LANGUAGE_CODE)
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
    # ISO 639-2/3 codes clients send for the same languages
    "cmn": "zh", "zho": "zh", "chi": "zh", "yue": "yue", "eng": "en", "spa": "es", "fra": "fr", "fre": "fr",
    "deu": "de", "ger": "de", "jpn": "ja", "kor": "ko", "rus": "ru", "por": "pt", "ita": "it", "ara": "ar",
    "hin": "hi", "vie": "vi", "tha": "th", "ind": "id", "nld": "nl", "dut": "nl", "tur": "tr", "pol": "pl",
    "ukr": "uk", "heb": "he", "iw": "he", "nob": "no", "nb": "no", "nn": "nn", "fil": "tl", "jw": "jw", "jv": "jw",
}


def normalize_language(value: str) -> str:
    """The Whisper code for a language code, tag or name.

    A region or script subtag is dropped (`zh-CN`, `zh_Hant_TW`, `en-US` -> `zh`, `en`); case does
    not matter; ISO 639-2/3 codes and English names map to the 639-1 code Whisper uses.

    Raises:
        ValueError: Not a language Whisper models know (the message names the value).
    """
    text = value.strip().lower().replace("_", "-")
    primary = text.split("-", 1)[0]
    for candidate in (text, primary):
        if candidate in WHISPER_LANGUAGES:
            return candidate
        if candidate in _ALIASES:
            return _ALIASES[candidate]
    by_name = {name: code for code, name in WHISPER_LANGUAGES.items()}
    if text in by_name:
        return by_name[text]
    raise ValueError(
        f"Got {value!r} for language; expected an ISO 639-1 code of a language Whisper models know "
        f"(such as 'zh', 'en', 'de'; GET /v1/models lists each model's languages)."
    )


_TRADITIONAL_SUBTAGS = frozenset({"hant", "tw", "hk", "mo"})


def asks_traditional_script(value: str) -> bool:
    """Whether a Chinese language tag names Traditional script or a region that writes it
    (`zh-TW`, `zh-HK`, `zh-MO`, `zh-Hant`)."""
    parts = value.strip().lower().replace("_", "-").split("-")
    return parts[0] in ("zh", "cmn", "yue", "zho", "chi") and bool(_TRADITIONAL_SUBTAGS.intersection(parts[1:]))
