"""Questions about a passage: templates written from a Wikipedia title and text, and the cleaning of questions
that a model wrote itself.

Template questions (:func:`template_questions`) are answerable from the passage by construction: each comes
from a simple pattern found in one sentence about the article's subject, and its gold answer is a verbatim
span of the passage (the empty string for the two open questions, which ask for what the passage says).

=====================  =========================================================  ======================
Template               Pattern (in a sentence about the subject)                  Question
=====================  =========================================================  ======================
``definition``         first sentence ``<subject> is|was|are|were <predicate>``   What is / Who was X?
``born`` / ``died``    ``(<date> – <date>)`` after the name, ``born in <year>``    When was X born? ...
``by``                 ``written|directed|founded|... by <Name>``                 Who directed X?
``year``               ``was founded|built|published|... in <year>``              When was X founded?
``location``           ``located|situated|based in <Place>``, ``a city in <P>``   Where is X (located)?
``population``         ``population of (about) <number>``                         What is the population?
``alias``              ``also known as|also called <Name>``                       What is another name?
``capital``            ``capital (and largest city) is <Name>``                   What is the capital?
``known_for``          a person's lead                                            What is X known for?
``about``              any lead                                                   What does ... say?
=====================  =========================================================  ======================

:func:`clean_generated_questions` turns a model's numbered or bulleted list of questions into clean,
distinct, single-line questions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "TemplateQuestion",
    "clean_generated_questions",
    "content_words",
    "normalize_question",
    "sentence_spans",
    "split_sentences",
    "template_questions",
]


@dataclass(frozen=True)
class TemplateQuestion:
    """A question written by a template.

    Attributes:
        template: the template's name (see the module docstring).
        question: the question, one line, ending in ``?``.
        answer: its gold answer, a verbatim span of the passage, or ``""`` for open questions.
    """

    template: str
    question: str
    answer: str


# ------------------------------------------------------------------------------------------- sentences

# Sentence ends: . ! ? followed by whitespace and an upper-case letter, a digit or a quote (so that "Dr. X"
# and "U.S. state" rarely split, while ordinary sentences do), and line breaks.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[A-Z0-9\"“(])|\n+")
_ABBREVIATIONS = re.compile(r"\b(?:[A-Z]|Dr|Mr|Mrs|Ms|St|Mt|Jr|Sr|No|Op|Vol|vs|c|ca|e\.g|i\.e|etc)\.\Z")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of each sentence of ``text`` (surrounding whitespace excluded), split after ``.``,
    ``!``, ``?`` and at line breaks. A full stop after a one-letter initial or a common abbreviation
    (``Dr.``, ``St.``, ``Op.``, ...) does not end a sentence."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start : match.start()]
        if "\n" not in match.group() and _ABBREVIATIONS.search(piece.rstrip("\"'”’)]")):
            continue  # the sentence goes on; `start` stays
        if piece.strip():
            spans.append(_strip_span(text, start, match.start()))
        start = match.end()
    if text[start:].strip():
        spans.append(_strip_span(text, start, len(text)))
    return spans


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (:func:`sentence_spans`), each a stripped slice of it."""
    return [text[a:b] for a, b in sentence_spans(text)]


# ------------------------------------------------------------------------------------------- subjects

_TITLE_PAREN = re.compile(r"\s*\([^)]*\)\s*$")
_LEADING_FIELD = re.compile(r"^(?:In|Within|Throughout|During|According to) [^,]{1,60}, ")
_COPULA = re.compile(r"\b(is|was|are|were)\b")
_PRONOUN_START = re.compile(r"^(?:It|He|She|They|This|The (?:\w+ ){0,2}?\w+)\b")
_PEOPLE_WORDS = re.compile(
    r"\b(?:politician|writer|poet|painter|composer|philosopher|scientist|physicist|chemist|mathematician|"
    r"actor|actress|singer|musician|king|queen|emperor|empress|president|general|leader|explorer|inventor|"
    r"engineer|theologian|saint|pope|novelist|playwright|artist|sculptor|architect|economist|statesman|"
    r"footballer|player|athlete|director|businessman|businesswoman|activist|monarch|ruler|priest|prophet|"
    r"biologist|astronomer|psychologist|sociologist|historian|author|lawyer|journalist|dancer|rapper|"
    r"songwriter|filmmaker|nun|monk|pharaoh|sultan|tsar|czar|khan|prince|princess|duke|lord|revolutionary|"
    r"officer|soldier|admiral|aviator|astronaut|cosmonaut|diplomat|teacher|physician|surgeon|nurse|"
    r"comedian|model|entrepreneur|industrialist|reformer|missionary|scholar|conductor|pianist|violinist|"
    r"guitarist|drummer|band|man|woman|boy|girl|person)s?\b"
)


def _clean_title(title: str) -> str:
    """The title without a disambiguation in brackets: ``"Lift (force)"`` -> ``"Lift"``."""
    cleaned = _TITLE_PAREN.sub("", title).strip()
    return cleaned or title.strip()


def _subject_phrase(sentence: str, title: str) -> str | None:
    """The subject of a definition sentence (``"The tomato"`` in ``"The tomato is a plant ..."``) when it is
    short and names the title, else None."""
    body = _LEADING_FIELD.sub("", sentence)
    match = _COPULA.search(body)
    if match is None:
        return None
    subject = body[: match.start()].strip().rstrip(",")
    subject = re.sub(r"\s*\([^)]*\)", "", subject).strip()  # "Infrared (IR)" -> "Infrared"
    if "," in subject:
        subject = subject.split(",")[0].strip()
    words = subject.split()
    if not 1 <= len(words) <= 8:
        return None
    head = _clean_title(title).casefold()
    if head not in subject.casefold() and subject.casefold() not in head:
        return None
    return subject


def _name_for_question(subject: str, text: str) -> str:
    """The subject as written inside a question: a leading article lower-cased (``"the Moon"``), and a
    common noun lower-cased when the passage writes it so (``"Tennis"`` -> ``"tennis"``)."""
    first, _, rest = subject.partition(" ")
    if first in ("The", "A", "An") and rest:
        return first.lower() + " " + rest
    lowered = subject[:1].lower() + subject[1:]
    if lowered != subject and re.search(rf"(?<![\w-]){re.escape(lowered)}(?![\w-])", text):
        return lowered
    return subject


def _starts_with_subject(sentence: str, subject: str, title: str) -> bool:
    low = sentence.casefold()
    return any(name and low.startswith(name.casefold()) for name in (subject, _clean_title(title)))


def _about_subject(sentence: str, index: int, subject: str, title: str) -> bool:
    """Whether ``sentence`` (number ``index`` in the passage) is about the article's subject."""
    if index == 0:
        return True
    low = sentence.casefold()
    for name in (subject, _clean_title(title)):
        if name and low.startswith(name.casefold()):
            return True
    return bool(_PRONOUN_START.match(sentence)) and index <= 3


# ------------------------------------------------------------------------------------------- answers

_NAME_WORD = r"(?:[A-Z][\w.'’&-]*|(?:de|da|del|der|di|du|van|von|la|le|al|bin|ibn|of|the|and|y)(?=\s+[A-Z]))"
_NAME = rf"{_NAME_WORD}(?:\s+{_NAME_WORD})*"
# a name used as a noun: not a possessive, not an adjective before a lower-case noun ("the Indian state")
_LINKS = "of|in|and|or|on|at|from|to|by|with|for|as|since|until|is|was|which|that|who|where|near"
_NAME_END = (
    r"(?!['’]s\b)(?![\w'’-])(?!\s+[a-z][a-z-]*\s+(?:of|in)\s+[A-Z])"
    rf"(?!\s+(?!(?:{_LINKS})\b)[a-z])"
)
_MONTH = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December|"
    r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?"
)
_DATE = (
    rf"(?:(?:c\.\s*|circa\s+)?(?:\d{{1,2}}\s+{_MONTH}\s+|{_MONTH}\s+(?:\d{{1,2}},?\s+)?)?\d{{3,4}}"
    r"(?:\s*(?:BC|BCE|AD|CE)\b)?)"
)
_LIFESPAN = re.compile(rf"\((?:born\s+)?(?P<born>{_DATE})\s*[–—-]\s*(?P<died>{_DATE})\)")
_BORN_DATE = re.compile(rf"\b(?:was|is)\s+born\s+(?:on\s+|in\s+)?(?P<date>{_DATE})(?![\d,])")
_BORN_PLACE = re.compile(rf"\b(?:was|is)\s+born\s+in\s+(?:the\s+)?(?P<place>{_NAME}){_NAME_END}")
#: participle -> the past tense of "Who <verb> X?"
_AGENT_VERBS = {
    "written": "wrote", "directed": "directed", "founded": "founded", "painted": "painted",
    "composed": "composed", "designed": "designed", "invented": "invented", "developed": "developed",
    "produced": "produced", "built": "built", "created": "created", "established": "established",
    "published": "published", "proposed": "proposed", "formulated": "formulated",
    "commissioned": "commissioned",
    "sculpted": "sculpted", "authored": "authored", "named": "named", "introduced": "introduced",
    "first described": "first described", "described": "described", "constructed": "constructed",
    "conceived": "conceived", "recorded": "recorded", "led": "led", "discovered": "discovered",
}  # fmt: skip
_VERB_ALT = "|".join(sorted(_AGENT_VERBS, key=len, reverse=True))
_BY_AGENT = re.compile(rf"\b(?P<verb>{_VERB_ALT})\s+by\s+(?:the\s+)?(?P<agent>{_NAME}){_NAME_END}")
_PASSIVE_START = re.compile(
    rf"^(?:It|He|She|They|This|The \w+(?: \w+)?|(?P<name>[A-Z][^,]{{0,60}}?))\s+(?:is|was|were|are)\s+"
    rf"(?:(?:first|originally|officially|formally|largely|later|jointly|mainly)\s+)?(?:{_VERB_ALT})\s+by\b"
)
_YEAR_VERBS = (
    "founded|established|built|completed|published|released|discovered|invented|formed|created|opened|"
    "written|composed|painted|launched|signed|introduced|described|adopted|declared|constructed|ratified|"
    "premiered|first performed|first published|first described|inaugurated|incorporated|dissolved|abolished"
)
_PASSIVE_YEAR = re.compile(
    rf"^(?:It|They|This|The \w+(?: \w+)?|(?P<name>[A-Z][^,]{{0,60}}?))\s+(?P<cop>is|was|were|are)\s+"
    rf"(?:(?:first|originally|officially|formally|largely|later)\s+)?(?P<verb>{_YEAR_VERBS})\b[^.;]{{0,60}}?"
    rf"\s+in\s+(?P<date>{_DATE})(?![\d,])"
)
_WORK_YEAR = re.compile(
    r"\b(?:is|was)\s+an?\s+(?P<year>\d{4})\s+(?:[\w-]+\s+){0,5}?(?P<noun>film|novel|album|song|single|"
    r"painting|play|opera|ballet|poem|video game|book|musical|television series|symphony|sculpture|"
    r"short story|novella|comedy|tragedy|treaty|speech)\b"
)
_WORK_VERB = {
    "film": "released", "album": "released", "song": "released", "single": "released",
    "video game": "released",
    "television series": "first broadcast", "novel": "published", "book": "published", "novella": "published",
    "short story": "published", "poem": "written", "play": "written", "comedy": "written",
    "tragedy": "written", "painting": "painted", "sculpture": "made", "opera": "composed",
    "ballet": "composed", "musical": "written",
    "symphony": "composed", "treaty": "signed", "speech": "given",
}  # fmt: skip
_LOCATED = re.compile(
    rf"^(?:It|They|The \w+(?: \w+)?|(?P<name>[A-Z][^,]{{0,60}}?))\s+(?:is|are|was|were)\s+"
    rf"(?:(?:mainly|mostly|primarily|largely)\s+)?(?:located|situated|based|headquartered)\s+in\s+(?:the\s+)?"
    rf"(?P<place>{_NAME}){_NAME_END}"
)
_PLACE_NOUN = re.compile(
    rf"^an?\s+(?:[\w-]+\s+){{0,4}}?(?:city|town|village|country|state|province|region|island|municipality|"
    rf"county|port|district|river|lake|mountain range|desert|peninsula|sea|archipelago|metropolis|territory|"
    rf"nation|kingdom|commune|capital|empire|sultanate|republic|prefecture)\s+(?:located\s+|situated\s+)?"
    rf"(?:in|of)\s+(?:the\s+)?(?:(?:north|south|east|west|northern|southern|eastern|western|central|"
    rf"northeastern|northwestern|southeastern|southwestern)\s+)?(?P<place>{_NAME}){_NAME_END}"
)
_POPULATION = re.compile(
    r"\bpopulation\s+of\s+(?:about\s+|around\s+|approximately\s+|roughly\s+|over\s+|more\s+than\s+|"
    r"nearly\s+|almost\s+|some\s+|just\s+(?:over|under)\s+)?"
    r"(?P<n>\d[\d,.]*\d(?:\s+(?:million|billion|thousand))?|\d(?:\s+(?:million|billion|thousand))?)"
)
_COUNT = re.compile(
    r"^(?:It|They|(?P<name>[A-Z][^,]{0,60}?))\s+(?P<verb>has|have|had|contains|contained|comprises|comprised|"
    r"includes|included|consists of|consisted of)\s+(?:about\s+|around\s+|approximately\s+|roughly\s+|"
    r"over\s+|more\s+than\s+|nearly\s+|almost\s+|some\s+)?(?P<n>\d[\d,.]*(?:\s+(?:million|billion|"
    r"thousand))?)\s+(?P<noun>(?:[a-z][a-z-]+\s+){0,2}?[a-z][a-z-]+s)\b"
)
_COUNT_VERB = {
    "has": ("does", "have"), "have": ("do", "have"), "had": ("did", "have"), "contains": ("does", "contain"),
    "contained": ("did", "contain"), "comprises": ("does", "comprise"), "comprised": ("did", "comprise"),
    "includes": ("does", "include"), "included": ("did", "include"), "consists of": ("does", "consist of"),
    "consisted of": ("did", "consist of"),
}  # fmt: skip
_ALIAS = re.compile(
    r"\b(?:also|commonly|often|sometimes|historically|formerly|better)\s+(?:known|called|referred\s+to)\s+as\s+"
    r"(?:the\s+)?(?P<alias>[^,;.()\[\]]{2,60})|\b(?:also|commonly|often|sometimes)\s+called\s+(?:the\s+)?"
    r"(?P<alias2>[^,;.()\[\]]{2,60})"
)
_CAPITAL = re.compile(
    rf"\b(?:[Ii]ts|[Tt]he)\s+capital(?:\s+and\s+(?:largest|most\s+populous)\s+city)?\s+(?:is|was)\s+"
    rf"(?P<capital>{_NAME}){_NAME_END}"
)
_SUPERLATIVE = re.compile(
    r"^the\s+(?:(?:\w+|\w+-\w+)\s+)?(?:largest|longest|highest|oldest|smallest|deepest|tallest|busiest|"
    r"most\s+populous|first|only|capital|biggest|earliest|fastest|hottest|coldest|brightest|heaviest|"
    r"lightest|second|third|fourth|fifth)\b"
)
_ELEMENT = re.compile(r"\bsymbol\s+(?P<symbol>[A-Z][a-z]?)\s+and\s+atomic\s+number\s+(?P<number>\d{1,3})\b")
_NATIONALITY = re.compile(r"^an?\s+(?P<nat>[A-Z][a-z]+(?:-[A-Z][a-z]+)?)\s+(?:[a-z-]+\s+){0,2}?[a-z-]+")
_PREDICATE_END = re.compile(
    r",|;|:|\s\(|\s(?:(?:in|of|by|on|at|to|for|from|with|through|under|during)\s)?(?:which|whom|whose)\s|"
    r"\s(?:that|who|where|when|while|although|though|because|but|and\s+is|and\s+was)\s"
)
_HEAD_STOP = re.compile(r"\s(?:of|by|in|from|for|that|which|who|with|on|at|whose|to|and\s+the)\s|,|;")


_TRAILING = frozenset(("of", "the", "and", "de", "da", "van", "von", "y", "al", "bin", "ibn", "la"))


def _trim_name(name: str) -> str:
    """A captured name without trailing connective words (``"Tolkien and"`` -> ``"Tolkien"``)."""
    words = name.split()
    while words and words[-1] in _TRAILING:
        words.pop()
    return " ".join(words).rstrip(".,")


def _predicate(sentence: str) -> tuple[str, str] | None:
    """``(copula, predicate)`` of a definition sentence, or None."""
    body = _LEADING_FIELD.sub("", sentence)
    match = _COPULA.search(body)
    if match is None:
        return None
    return match.group(1), body[match.end() :].strip()


def _definition_answer(predicate: str) -> tuple[str, bool] | None:
    """``(answer, whole)``: the predicate's noun phrase up to the first clause boundary (at most 16 words;
    ``whole`` is False when it was cut there), or None when it does not start with an article."""
    end = _PREDICATE_END.search(predicate)
    answer = (predicate[: end.start()] if end else predicate).strip().rstrip(".")
    words = answer.split()
    whole = len(words) <= 16
    if not whole:
        answer = " ".join(words[:16])
    if len(answer.split()) < 2 or not re.match(r"(?:an?|the|one|any)\b", answer, re.I):
        return None
    return answer, whole


def _head(predicate: str) -> str:
    """The head noun phrase of a predicate (``"a K-pop song"`` of ``"a K-pop song by ..."``)."""
    match = _HEAD_STOP.search(predicate)
    return predicate[: match.start()] if match else predicate[:80]


def template_questions(
    title: str, text: str, topic: str = "", first_piece: bool = True
) -> list[TemplateQuestion]:
    """Template questions about a Wikipedia lead (``title``, ``text``), each answerable from ``text``.

    Args:
        title: the article's title (a bracketed disambiguation is left out of questions).
        text: the passage (the lead, or one piece of it).
        topic: the article's topic (``"People"`` makes "who" questions), optional.
        first_piece: whether ``text`` starts the lead (only then is its first sentence the definition).

    Returns:
        Distinct questions in template order; a gold answer is a verbatim span of ``text`` or ``""``.
    """
    sentences = split_sentences(text)
    if not sentences:
        return []
    first = sentences[0]
    defined = _subject_phrase(first, title) if first_piece else None
    subject = defined or _clean_title(title)
    name = _name_for_question(subject, text)
    parts = _predicate(first) if defined else None
    cop, predicate = parts if parts else ("is", "")
    head = _head(predicate)
    person = topic == "People" or bool(
        defined and re.match(r"(?:an?|the)\s", head) and _PEOPLE_WORDS.search(head)
    )
    out: list[TemplateQuestion] = []

    def add(template: str, question: str, answer: str) -> None:
        answer = answer.strip()
        if answer and answer not in text:  # cannot happen for spans; guards the contract
            return
        if answer and answer.casefold() in question.casefold():
            return
        if any(q.question == question for q in out):
            return
        out.append(TemplateQuestion(template, question, answer))

    who = "Who" if person else "What"
    if defined and predicate:
        found = _definition_answer(predicate)
        if found is not None:
            add("definition", f"{who} {cop} {name}?", found[0])
            if _SUPERLATIVE.match(predicate) and found[1] and subject in text:
                add("identify", f"{who} {cop} {found[0]}?", subject)
        nat = _NATIONALITY.match(head)
        if person and nat:
            add("nationality", f"What nationality {cop} {name}?", nat["nat"])
        work = _WORK_YEAR.search(first)
        if work and not person:
            verb = _WORK_VERB[work["noun"]]
            add("year", f"In what year was {name} {verb}?", work["year"])
        place = _PLACE_NOUN.match(predicate)
        if place and not person:
            where = _trim_name(place["place"])
            if where and where.casefold() not in name.casefold():
                add("location", f"Where {cop} {name} located?", where)
    for index, sentence in enumerate(sentences):
        if not _about_subject(sentence, index if first_piece else index + 1, subject, title):
            continue
        own = _starts_with_subject(sentence, subject, title)
        if index > 0 and subject in text:
            match = re.match(r"(?:It|He|She) (?P<cop>is|was) (?P<rest>the .*)", sentence)
            if match and _SUPERLATIVE.match(match["rest"]):
                found = _definition_answer(match["rest"])
                if found is not None and found[1] and len(found[0].split()) >= 4:
                    add("identify", f"{who} {match['cop']} {found[0]}?", subject)
        match = _ELEMENT.search(sentence) if index == 0 else None
        if match:
            add("symbol", f"What is the chemical symbol of {name}?", match["symbol"])
            add("atomic_number", f"What is the atomic number of {name}?", match["number"])
        if person:
            span = _LIFESPAN.search(sentence)
            if span and index == 0 and first_piece:
                add("born", f"When was {name} born?", span["born"])
                add("died", f"When did {name} die?", span["died"])
            match = _BORN_DATE.search(sentence)
            if match:
                add("born", f"When was {name} born?", match["date"])
            match = _BORN_PLACE.search(sentence)
            if match:
                add("birthplace", f"Where was {name} born?", _trim_name(match["place"]))
        match = _BY_AGENT.search(sentence)
        if match and not person:
            by_subject = (
                index == 0
                and first_piece
                and defined is not None
                and match.start() > len(subject)
                and sentence.find(predicate[:20]) <= match.start()
            )
            start = _PASSIVE_START.match(sentence)
            if by_subject or (start and (start["name"] is None or own)):
                agent = _trim_name(match["agent"])
                if (
                    agent
                    and agent.casefold() not in name.casefold()
                    and (
                        2 <= len(agent.split()) <= 6
                        or (agent.isalpha() and not agent.endswith(("an", "ish", "ese")))
                    )
                    and agent not in ("United", "The", "New", "Saint", "St")
                ):
                    add("by", f"Who {_AGENT_VERBS[match['verb']]} {name}?", agent)
        match = _PASSIVE_YEAR.match(sentence)
        if match and not person and (match["name"] is None or own):
            tense = "were" if match["cop"] in ("were", "are") else "was"
            add("year", f"When {tense} {name} {match['verb']}?", match["date"])
        match = _COUNT.match(sentence)
        if match and (match["name"] is None or own):
            aux, verb = _COUNT_VERB[match["verb"]]
            if (cop in ("are", "were") or subject.endswith("s")) and aux == "does":
                aux = "do"
            add("count", f"How many {match['noun']} {aux} {name} {verb}?", match["n"].rstrip(".,"))
        if not person:
            match = _LOCATED.match(sentence)
            if match and (match["name"] is None or own):
                where = _trim_name(match["place"])
                if where and where.casefold() not in name.casefold():
                    add("location", f"Where {cop} {name} located?", where)
            match = _POPULATION.search(sentence)
            if match and (own or index == 0 or re.match(r"(?:It|Its|The city|The country)\b", sentence)):
                add("population", f"What is the population of {name}?", match["n"].rstrip(".,"))
            match = _CAPITAL.search(sentence)
            if match:
                capital = _trim_name(match["capital"])
                if capital and capital.casefold() not in name.casefold():
                    add("capital", f"What is the capital of {name}?", capital)
        match = _ALIAS.search(sentence) if index <= 1 else None
        if match:
            alias = (match["alias"] or match["alias2"]).strip()
            alias = re.split(r"\s(?:or|and|in|by|for|is|was|are|were|because|from|after|to)\s", alias)[
                0
            ].strip()
            alias = alias.strip("\"'“”")
            if alias and alias.casefold() != name.casefold() and 1 <= len(alias.split()) <= 6:
                add("alias", f"What is another name for {name}?", alias)
    if person:
        add("known_for", f"What is {name} known for?", "")
    add("about", f"What does the text say about {name}?", "")
    return out


# ------------------------------------------------------------------------------------------- cleaning

_LIST_MARKER = re.compile(
    r"^\s*(?:(?:\d{1,2}|[a-zA-Z])[.):]|[-*•·–]|Q\d*[.:)]|\(?\d{1,2}\)|(?:Question|Q)\s*\d*\s*[.:)-])\s*",
    re.I,
)
_WORD = re.compile(r"\w+")
_STOP = frozenset(
    [
        "a", "an", "the", "of", "in", "on", "at", "to", "for", "from", "by", "with", "and", "or", "is",
        "are", "was", "were", "be", "been", "being", "do", "does", "did", "what", "who", "whom",
        "whose", "which", "when", "where", "why", "how", "this", "that", "these", "those", "it", "its",
        "as", "about", "into", "than", "then", "there", "their", "they", "he", "she", "his", "her",
        "we", "you", "your", "i", "me", "my", "can", "could", "would", "should", "will", "may", "might",
        "must", "has", "have", "had", "not", "no", "yes",
    ]
)  # fmt: skip


def normalize_question(question: str) -> str:
    """Lower-cased words of ``question`` joined by single spaces (for finding duplicates)."""
    return " ".join(_WORD.findall(question.casefold()))


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """Lower-cased, lightly stemmed words of ``text`` (``"lives"`` -> ``"live"``, ``"eating"`` -> ``"eat"``)
    longer than two letters, without common function words."""
    return {_stem(w) for w in _WORD.findall(text.casefold()) if w not in _STOP and len(w) > 2}


def clean_generated_questions(
    text: str,
    passage: str,
    limit: int,
    existing: Iterable[str] = (),
    min_words: int = 3,
    max_words: int = 30,
) -> list[str]:
    """Usable questions from a model's reply ``text`` that asked for questions about ``passage``.

    Each line (and each ``?``-terminated sentence within a line) is a candidate: list markers (``1.``,
    ``-``, ``Q2:``, ``Question 3:``) and quotes are removed; it is kept when it ends in ``?``, has
    ``min_words`` .. ``max_words`` words, shares at least one content word with ``passage`` (else it is not
    about it), is not a copy of a sentence of the passage and is not a duplicate (same words, case
    ignored) of an earlier candidate or of ``existing``.

    Returns:
        At most ``limit`` questions, in the order they were written.
    """
    seen = {normalize_question(q) for q in existing}
    passage_words = content_words(passage)
    passage_norm = normalize_question(passage)
    out: list[str] = []
    for line in text.splitlines():
        line = _LIST_MARKER.sub("", line.strip()).strip().strip("\"'“”*").strip()
        for candidate in re.findall(r"[^?]*\?", line):
            candidate = _LIST_MARKER.sub("", candidate.strip()).strip().strip("\"'“”*").strip()
            candidate = re.sub(r"\s+", " ", candidate)
            words = candidate.split()
            if not min_words <= len(words) <= max_words or not candidate[:1].isalnum():
                continue
            key = normalize_question(candidate)
            if not key or key in seen or key in passage_norm and len(words) > 6:
                continue
            if not content_words(candidate) & passage_words:
                continue
            seen.add(key)
            out.append(candidate[:1].upper() + candidate[1:])
            if len(out) >= limit:
                return out
    return out
