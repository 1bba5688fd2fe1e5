"""Speak known text into audio files with espeak-ng: the samples at build time, and test clips on demand.

    render-speech --text "Hello there" --out data/x.mp3 [--voice en-us] [--speed 150]
    render-speech --text-file long.txt --out data/long.wav        (the whole file as one clip)
    render-speech --silence 3 --out data/quiet.wav                (seconds of digital silence)
    render-speech --from samples.txt --out samples/               (a clip and a .txt per paragraph)

The format follows the extension: wav, mp3, ogg or opus (Opus), m4a (AAC), flac, and mp4 (H.264 video with AAC
audio) or webm (VP8 video with Opus audio), encoded with PyAV's own FFmpeg.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import av
import numpy as np

AUDIO_CODECS = {".mp3": ("libmp3lame", None), ".ogg": ("libopus", 48000), ".opus": ("libopus", 48000),
                ".m4a": ("aac", None), ".flac": ("flac", None), ".mp4": ("aac", None), ".webm": ("libopus", 48000),
                ".mkv": ("flac", None)}
VIDEO_CODECS = {".mp4": "libx264", ".webm": "libvpx"}
SAMPLE_FORMATS = (".wav", ".mp3", ".ogg")
SILENCE_RATE = 16000
FRAMES_PER_SECOND = 5


def speak(text: str, voice: str, speed: int) -> tuple[np.ndarray, int]:
    """espeak-ng's speech for `text`: 16-bit mono samples and their rate."""
    with tempfile.TemporaryDirectory() as folder:
        target = os.path.join(folder, "speech.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", target, "--stdin"], input=text.encode(),
                       check=True, timeout=600)
        with wave.open(target) as handle:
            rate = handle.getframerate()
            samples = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)
    return samples, rate


def write_wav(samples: np.ndarray, rate: int, path: str) -> None:
    with wave.open(path, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.astype(np.int16).tobytes())


def encode(samples: np.ndarray, rate: int, path: str) -> None:
    extension = Path(path).suffix.lower()
    if extension == ".wav":
        write_wav(samples, rate, path)
        return
    if extension not in AUDIO_CODECS:
        raise SystemExit(f"render-speech: no encoder for {extension!r} (use wav, {', '.join(AUDIO_CODECS)})")
    codec, codec_rate = AUDIO_CODECS[extension]
    with av.open(path, "w") as container:
        video = None
        if extension in VIDEO_CODECS:
            video = container.add_stream(VIDEO_CODECS[extension], rate=FRAMES_PER_SECOND)
            video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = container.add_stream(codec, rate=codec_rate or rate, layout="mono")
        if video is not None:
            black = np.zeros((64, 64, 3), dtype=np.uint8)
            for index in range(int(np.ceil(len(samples) / rate * FRAMES_PER_SECOND)) + 1):
                frame = av.VideoFrame.from_ndarray(black, format="rgb24")
                frame.pts = index
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
        frame = av.AudioFrame.from_ndarray(samples.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def paragraphs(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return [p.strip() for p in "\n".join(lines).split("\n\n") if p.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="render-speech", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the words to speak")
    source.add_argument("--text-file", help="a text file, spoken whole into one clip")
    source.add_argument("--silence", type=float, help="seconds of silence instead of speech")
    source.add_argument("--from", dest="samples", help="a text file: one clip (and its .txt) per paragraph")
    parser.add_argument("--out", required=True, help="the file (its extension picks the format), or a folder (--from)")
    parser.add_argument("--voice", default="en-us", help="espeak-ng voice, e.g. en-us, de, nl, fr")
    parser.add_argument("--speed", type=int, default=150, help="words per minute")
    args = parser.parse_args(argv)
    folder = args.out if args.samples else os.path.dirname(args.out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    if args.samples:
        with open(args.samples, encoding="utf-8") as handle:
            texts = paragraphs(handle.read())
        for index, text in enumerate(texts, start=1):
            path = os.path.join(args.out, f"sample_{index}{SAMPLE_FORMATS[(index - 1) % len(SAMPLE_FORMATS)]}")
            encode(*speak(text, args.voice, args.speed), path)
            Path(path).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
            print(path)
        return 0
    if args.silence is not None:
        encode(np.zeros(int(args.silence * SILENCE_RATE), dtype=np.int16), SILENCE_RATE, args.out)
    else:
        if args.text_file:
            with open(args.text_file, encoding="utf-8") as handle:
                text = handle.read()
        else:
            text = args.text.replace("\\n", "\n")
        encode(*speak(text, args.voice, args.speed), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
