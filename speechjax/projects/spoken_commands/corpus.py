"""A templated spoken-command domain (in the spirit of Fluent Speech Commands / SLURP).

Every utterance has an English transcript (lowercase words, numbers spelled
out), an intent label (13 intents) and a French translation generated from a
parallel template, so French word order, articles, contractions (du, au, aux,
jusqu'à l') and number words are right, not word-for-word.

Held-out sentences: the full set of sentences is enumerated and partitioned
per template by a seeded hash of the transcript (~76/12/12 train/dev/test),
so a dev or test transcript never occurs in train. `sample_split` then rejects dev/test
sentences that use a word train never saw: held-out sentences are new
combinations of known words, which is what a small model can be asked to
generalise to.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import functools
import hashlib
import itertools
import re

import numpy as np

# --- number words ------------------------------------------------------------

_EN_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = {
    20: "twenty",
    30: "thirty",
    40: "forty",
    50: "fifty",
    60: "sixty",
    70: "seventy",
    80: "eighty",
    90: "ninety"
}
_FR_UNITS = (
    "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze "
    "seize dix-sept dix-huit dix-neuf").split()
_FR_TENS = {20: "vingt", 30: "trente", 40: "quarante", 50: "cinquante", 60: "soixante"}


def english_number(n: int) -> str:
  """0..99 as words, no hyphen ('forty five') so each is a word for WER."""
  if n < 20:
    return _EN_UNITS[n]
  tens, unit = divmod(n, 10)
  return _EN_TENS[tens * 10] + ("" if unit == 0 else " " + _EN_UNITS[unit])


def french_number(n: int, feminine: bool = False) -> str:
  """0..99 in French: vingt et un, soixante-dix, quatre-vingts, quatre-vingt-onze."""
  if n == 1 and feminine:
    return "une"
  if n < 20:
    return _FR_UNITS[n]
  if n < 70:
    tens, unit = divmod(n, 10)
    base = _FR_TENS[tens * 10]
    if unit == 0:
      return base
    if unit == 1:
      return f'{base} et {"une" if feminine else "un"}'
    return f"{base}-{_FR_UNITS[unit]}"
  if n < 80:
    return "soixante et onze" if n == 71 else f"soixante-{french_number(n - 60)}"
  if n == 80:
    return "quatre-vingts"
  return f"quatre-vingt-{french_number(n - 80, feminine)}"


# --- French noun phrases -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Noun:
  """A slot value: English words and a French noun with its article ('le', 'la', "l'", 'les')."""
  en: str
  fr: str
  article: str = ""  # '' for names and cities (no article)


def _starts_with_vowel(word: str) -> bool:
  return word[:1] in "aeiouyéèêàâîôûœh"


_CONTRACTIONS = {("de", "le"): "du", ("de", "les"): "des", ("à", "le"): "au", ("à", "les"): "aux"}


def fr_form(noun: Noun, form: str) -> str:
  """French noun phrase after a preposition: def / de / de_bare / a / dans / jusqua / bare."""
  if form == "de_bare":  # quantity words take a bare "de": plus de lait, plus d'œufs
    return ("d'" if _starts_with_vowel(noun.fr) else "de ") + noun.fr
  if form == "bare" or not noun.article:
    phrase = noun.fr
    if form == "de":
      return ("d'" if _starts_with_vowel(phrase) else "de ") + phrase
    if form in ("a", "jusqua"):
      return ("jusqu'à " if form == "jusqua" else "à ") + phrase
    if form == "dans":
      return "à " + phrase  # cities: "à paris"
    return phrase
  definite = f"{noun.article}{noun.fr}" if noun.article == "l'" else f"{noun.article} {noun.fr}"
  if form == "def":
    return definite
  if form == "dans":
    return f"dans {definite}"
  if form in ("de", "a", "jusqua"):
    prep = "de" if form == "de" else "à"
    key = (prep, noun.article)
    phrase = f"{_CONTRACTIONS[key]} {noun.fr}" if key in _CONTRACTIONS else f"{prep} {definite}"
    return "jusqu'" + phrase if form == "jusqua" else phrase
  raise ValueError(f"Unknown French form {form!r}")


def _nouns(spec: str) -> tuple[Noun, ...]:
  """'kitchen=la cuisine; office=le bureau' -> Nouns (article split off the French)."""
  out = []
  for item in spec.split(";"):
    en, fr = (part.strip() for part in item.split("="))
    article = ""
    for candidate in ("le ", "la ", "les ", "l'"):
      if fr.startswith(candidate):
        article, fr = candidate.strip(), fr[len(candidate):]
        break
    out.append(Noun(en, fr, article))
  return tuple(out)


ROOMS = _nouns(
    "kitchen=la cuisine; living room=le salon; bedroom=la chambre; bathroom=la salle de bain; "
    "garage=le garage; office=le bureau; hallway=le couloir; dining room=la salle à manger; "
    "basement=le sous-sol; garden=le jardin; attic=le grenier; guest room=la chambre d'amis")
CITIES = _nouns(
    "london=londres; paris=paris; berlin=berlin; madrid=madrid; rome=rome; tokyo=tokyo; "
    "boston=boston; chicago=chicago; seattle=seattle; sydney=sydney; toronto=toronto; "
    "dublin=dublin; vienna=vienne; lisbon=lisbonne; athens=athènes; moscow=moscou; "
    "venice=venise; geneva=genève; brussels=bruxelles; edinburgh=édimbourg")
NAMES = tuple(
    Noun(n, n) for n in ("alice bob charlie david emma frank grace henry isabel jack karen "
                         "laura michael nina oliver paul rachel sarah thomas victor").split())
DAYS = _nouns("today=aujourd'hui; tomorrow=demain; tonight=ce soir; this weekend=ce week-end; "
              "on monday=lundi; on tuesday=mardi; on wednesday=mercredi; on thursday=jeudi; "
              "on friday=vendredi; on saturday=samedi; on sunday=dimanche")
PLACES = _nouns(
    "airport=l'aéroport; train station=la gare; museum=le musée; library=la bibliothèque; "
    "hospital=l'hôpital; supermarket=le supermarché; beach=la plage; park=le parc; "
    "pharmacy=la pharmacie; post office=la poste; stadium=le stade; hotel=l'hôtel; "
    "bakery=la boulangerie; city center=le centre-ville")
ITEMS = _nouns(
    "milk=le lait; eggs=les œufs; bread=le pain; coffee=le café; cheese=le fromage; "
    "apples=les pommes; butter=le beurre; rice=le riz; bananas=les bananes; tea=le thé; "
    "sugar=le sucre; tomatoes=les tomates; orange juice=le jus d'orange; pasta=les pâtes")
GENRES = _nouns("jazz=jazz; classical=classique; rock=rock; pop=pop; blues=blues; reggae=reggae; "
                "electronic=électronique; folk=folk; country=country; soul=soul")
ARTISTS = tuple(
    Noun(n, n) for n in "beethoven vivaldi debussy strauss tchaikovsky mozart chopin bach".split())
SONGS = (  # (song, artist) pairs so requests make sense
    (Noun("moonlight sonata", "la sonate au clair de lune"), "beethoven"),
    (Noun("ode to joy", "l'hymne à la joie"), "beethoven"),
    (Noun("for elise", "la lettre à élise"), "beethoven"),
    (Noun("the four seasons", "les quatre saisons"), "vivaldi"),
    (Noun("clair de lune", "clair de lune"), "debussy"),
    (Noun("the blue danube", "le beau danube bleu"), "strauss"),
    (Noun("swan lake", "le lac des cygnes"), "tchaikovsky"),
    (Noun("the nutcracker", "casse-noisette"), "tchaikovsky"),
    (Noun("the magic flute", "la flûte enchantée"), "mozart"),
    (Noun("the minute waltz", "la valse minute"), "chopin"),
)
SONG_TITLES = tuple(song for song, _ in SONGS)
MESSAGES = _nouns("i am running late=je suis en retard; see you soon=à bientôt; "
                  "i am on my way=je suis en route; happy birthday=joyeux anniversaire; "
                  "call me back=rappelle-moi; dinner is ready=le dîner est prêt; "
                  "the meeting is cancelled=la réunion est annulée; "
                  "i will be home at six=je serai à la maison à six heures")
MESSAGES = tuple(
    Noun(m.en, (m.article + " " + m.fr).strip() if m.article != "l'" else m.article + m.fr)
    for m in MESSAGES)
TEMPERATURES = tuple(Noun(english_number(n), french_number(n)) for n in range(16, 29))
STEPS = tuple(Noun(english_number(n), french_number(n)) for n in range(2, 11))


def _durations() -> tuple[Noun, ...]:
  out = [
      Noun("one minute", "une minute"),
      Noun("half an hour", "une demi-heure"),
      Noun("an hour", "une heure"),
      Noun("ninety seconds", "quatre-vingt-dix secondes")
  ]
  for n in (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 45):
    out.append(Noun(f"{english_number(n)} minutes", f"{french_number(n)} minutes"))
  for n in (10, 20, 30, 45):
    out.append(Noun(f"{english_number(n)} seconds", f"{french_number(n)} secondes"))
  return tuple(out)


def _times() -> tuple[Noun, ...]:
  out = []
  minutes = ((0, "o'clock", ""), (15, "fifteen", " quinze"), (30, "thirty", " trente"),
             (45, "forty five", " quarante-cinq"))
  periods = (("", ""), (" in the morning", " du matin"), (" in the evening", " du soir"))
  for hour in range(1, 13):
    fr_hour = f'{french_number(hour, feminine=True)} heure{"s" if hour > 1 else ""}'
    for (_, en_minute, fr_minute), (en_period, fr_period) in itertools.product(minutes, periods):
      out.append(
          Noun(f"{english_number(hour)} {en_minute}{en_period}",
               f"{fr_hour}{fr_minute}{fr_period}"))
  return tuple(out)


DURATIONS = _durations()
TIMES = _times()

SLOTS = {
    "song_title": SONG_TITLES,
    "room": ROOMS,
    "city": CITIES,
    "name": NAMES,
    "day": DAYS,
    "place": PLACES,
    "item": ITEMS,
    "genre": GENRES,
    "artist": ARTISTS,
    "message": MESSAGES,
    "temp": TEMPERATURES,
    "step": STEPS,
    "duration": DURATIONS,
    "time": TIMES
}

# (intent, English template, French template). '{slot}' in English; '{slot:form}'
# in French with form in def / de / de_bare / a / dans / jusqua / bare (see fr_form).
# {song} is special: it fills {song} and {artist} together.
TEMPLATES = (
    ("lights_on", "turn on the lights in the {room}", "allume les lumières {room:dans}"),
    ("lights_on", "switch on the {room} lights", "allume les lumières {room:de}"),
    ("lights_on", "please turn the {room} lights on",
     "allume les lumières {room:de} s'il te plaît"),
    ("lights_off", "turn off the lights in the {room}", "éteins les lumières {room:dans}"),
    ("lights_off", "switch off the {room} lights", "éteins les lumières {room:de}"),
    ("lights_off", "please turn the {room} lights off",
     "éteins les lumières {room:de} s'il te plaît"),
    ("set_temperature", "set the temperature to {temp} degrees",
     "règle la température à {temp:bare} degrés"),
    ("set_temperature", "make it {temp} degrees in the {room}",
     "mets {room:def} à {temp:bare} degrés"),
    ("set_temperature", "set the {room} heating to {temp} degrees",
     "règle le chauffage {room:de} à {temp:bare} degrés"),
    ("play_music", "play {song} by {artist}", "joue {song:def} de {artist:bare}"),
    ("play_music", "play some {genre} music in the {room}",
     "mets de la musique {genre:bare} {room:dans}"),
    ("play_music", "put on some music by {artist}", "mets de la musique de {artist:bare}"),
    ("play_music", "play {song_title} in the {room}", "joue {song_title:bare} {room:dans}"),
    ("play_music", "put on some {artist} in the {room}", "mets du {artist:bare} {room:dans}"),
    ("set_alarm", "set an alarm for {time}", "règle une alarme pour {time:bare}"),
    ("set_alarm", "wake me up at {time}", "réveille-moi à {time:bare}"),
    ("set_alarm", "set an alarm for {time} {day}", "règle une alarme pour {time:bare} {day:bare}"),
    ("weather_query", "what is the weather in {city} {day}",
     "quelle est la météo {city:dans} {day:bare}"),
    ("weather_query", "will it rain in {city} {day}", "va-t-il pleuvoir {city:dans} {day:bare}"),
    ("weather_query", "what is the forecast for {city} {day}",
     "quelles sont les prévisions pour {city:bare} {day:bare}"),
    ("call_contact", "please call {name} now", "appelle {name:bare} maintenant s'il te plaît"),
    ("call_contact", "give {name} a call at home",
     "passe un coup de fil à {name:bare} à la maison"),
    ("call_contact", "phone {name} at work", "appelle {name:bare} au travail"),
    ("send_message", "send a message to {name} saying {message}",
     "envoie un message à {name:bare} pour dire {message:bare}"),
    ("send_message", "send {name} a text saying {message}",
     "envoie un texto à {name:bare} pour dire {message:bare}"),
    ("navigate", "take me to the {place}", "emmène-moi {place:a}"),
    ("navigate", "how do i get to the {place}", "comment aller {place:a}"),
    ("navigate", "navigate to the {place} in {city}", "guide-moi {place:jusqua} {city:de}"),
    ("set_timer", "set a timer for {duration}", "règle un minuteur de {duration:bare}"),
    ("set_timer", "start a timer for {duration} please",
     "lance un minuteur de {duration:bare} s'il te plaît"),
    ("set_timer", "i need a timer for {duration}", "j'ai besoin d'un minuteur de {duration:bare}"),
    ("volume_up", "turn the volume up by {step}", "monte le volume de {step:bare} crans"),
    ("volume_up", "turn the volume up in the {room}", "monte le volume {room:dans}"),
    ("volume_up", "make the {room} speaker louder", "mets l'enceinte {room:de} plus fort"),
    ("volume_down", "turn the volume down by {step}", "baisse le volume de {step:bare} crans"),
    ("volume_down", "turn the volume down in the {room}", "baisse le volume {room:dans}"),
    ("volume_down", "make the {room} speaker quieter", "mets l'enceinte {room:de} moins fort"),
    ("add_to_list", "add {item} to my shopping list", "ajoute {item:def} à ma liste de courses"),
    ("add_to_list", "put {item} on the shopping list", "mets {item:def} sur la liste de courses"),
    ("add_to_list", "we need more {item} from the shop",
     "il nous faut plus {item:de_bare} du magasin"),
)
INTENTS = tuple(sorted({t[0] for t in TEMPLATES}))
TRANSLATION_LANGUAGE = "French"

_SLOT_RE = re.compile(r"\{(\w+)(?::(\w+))?\}")


@dataclasses.dataclass(frozen=True)
class Sentence:
  text: str
  translation: str
  intent: str
  template: int
  slots: tuple[tuple[str, str], ...] = ()  # (slot name, English words) in the order spoken


def _fill(template: str, values: dict[str, Noun], french: bool) -> str:

  def sub(match):
    noun = values[match.group(1)]
    return fr_form(noun, match.group(2) or "def") if french else noun.en

  return " ".join(_SLOT_RE.sub(sub, template).split())


def _template_sentences(index: int) -> list[Sentence]:
  intent, en, fr = TEMPLATES[index]
  names = list(dict.fromkeys(m.group(1) for m in _SLOT_RE.finditer(en)))
  if "song" in names:
    combos = [{"song": song, "artist": Noun(artist, artist)} for song, artist in SONGS]
  else:
    combos = [dict(zip(names, values)) for values in itertools.product(*(SLOTS[n] for n in names))]
  return [Sentence(_fill(en, c, False), _fill(fr, c, True), intent, index,
                   tuple((name, c[name].en) for name in names)) for c in combos]


# --- summaries and questions (the summarize and spoken_qa tasks) -------------------------

# What a one-line summary says a command asks for; the slot words follow it.
INTENT_SUMMARIES = {
    "add_to_list": "add to the shopping list", "call_contact": "a phone call", "lights_off": "lights off",
    "lights_on": "lights on", "navigate": "directions", "play_music": "play music",
    "send_message": "send a message", "set_alarm": "an alarm", "set_temperature": "set the temperature",
    "set_timer": "a timer", "volume_down": "volume down", "volume_up": "volume up",
    "weather_query": "the weather",
}
# A question whose answer is the slot's words, per slot.
SLOT_QUESTIONS = {
    "room": "Which room is it about?", "city": "Which city is mentioned?", "name": "Who is the person named?",
    "day": "When is it for?", "place": "Where does the speaker want to go?", "item": "Which item is mentioned?",
    "genre": "Which kind of music?", "artist": "Which artist is named?", "message": "What should the message say?",
    "temp": "How many degrees?", "step": "By how many steps?", "duration": "How long is the timer?",
    "time": "At what time?", "song": "Which piece is asked for?", "song_title": "Which piece is asked for?",
}


def summary_of(sentence: Sentence) -> str:
  """A short summary of the command: what it asks for, then its slot words
  ('lights on: kitchen'; 'play music: moonlight sonata, beethoven')."""
  words = ", ".join(value for _, value in sentence.slots)
  return INTENT_SUMMARIES[sentence.intent] + (f": {words}" if words else "")


def question_about(sentence: Sentence) -> tuple[str, str]:
  """(question, answer) about one slot of the sentence, the slot chosen by a
  hash of the transcript, so a sentence always gets the same question."""
  if not sentence.slots:
    raise ValueError(f"{sentence.text!r} has no slot to ask about")
  name, value = sentence.slots[_rank(sentence.text, 7) % len(sentence.slots)]
  return SLOT_QUESTIONS[name], value


@functools.cache
def all_sentences() -> tuple[Sentence, ...]:
  """Every sentence of the domain, each transcript once."""
  seen, out = set(), []
  for index in range(len(TEMPLATES)):
    for sentence in _template_sentences(index):
      if sentence.text not in seen:
        seen.add(sentence.text)
        out.append(sentence)
  return tuple(out)


def vocabulary(texts: Iterable[str] | None = None) -> set[str]:
  texts = [s.text for s in all_sentences()] if texts is None else texts
  return {word for text in texts for word in text.split()}


def _rank(text: str, seed: int) -> int:
  return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big")


@functools.lru_cache(maxsize=8)
def partition(seed: int,
              held_out_fraction: float = 0.12) -> dict[str, dict[int, tuple[Sentence, ...]]]:
  """{split: {template index: sentences}} with disjoint transcripts across splits.

  Stratified per template: its sentences are ordered by a seeded hash and
  `held_out_fraction` of them (at least one each when it has 5 or more) go
  to dev and to test, so every template, hence every intent, is evaluated.
  """
  out = {split: {} for split in ("train", "dev", "test")}
  by_template: dict[int, list[Sentence]] = {i: [] for i in range(len(TEMPLATES))}
  for sentence in all_sentences():
    by_template[sentence.template].append(sentence)
  for index, pool in by_template.items():
    pool = sorted(pool, key=lambda s: _rank(s.text, seed))
    held = max(1, int(round(held_out_fraction * len(pool)))) if len(pool) >= 5 else 0
    out["dev"][index] = tuple(pool[:held])
    out["test"][index] = tuple(pool[held:2 * held])
    out["train"][index] = tuple(pool[2 * held:])
  return out


def sample_split(split: str, count: int, seed: int, rng: np.random.Generator,
                 known_words: set[str] | None = None) -> list[Sentence]:
  """`count` sentences of `split`: intent uniform, then template uniform, then slot values.

  With `known_words` (dev/test), sentences using words outside it are left
  out, except for an intent that would otherwise have none (tiny corpora).
  """
  pools = dict(partition(seed)[split])
  if known_words is not None:
    filtered = {
        i: tuple(s for s in pool if vocabulary([s.text]) <= known_words)
        for i, pool in pools.items()
    }
    for intent in INTENTS:
      templates = [i for i, t in enumerate(TEMPLATES) if t[0] == intent]
      if any(filtered[i] for i in templates):
        pools.update({i: filtered[i] for i in templates})
  by_intent = {
      intent: [i for i, t in enumerate(TEMPLATES) if t[0] == intent and pools[i]]
      for intent in INTENTS
  }
  usable = [intent for intent in INTENTS if by_intent[intent]]
  if not usable:
    raise ValueError(f"No sentences left for split {split!r} (seed {seed}).")
  out = []
  for _ in range(count):
    intent = usable[rng.integers(len(usable))]
    template = by_intent[intent][rng.integers(len(by_intent[intent]))]
    pool = pools[template]
    out.append(pool[rng.integers(len(pool))])
  return out
