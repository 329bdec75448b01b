"""Step 8 of the call: the image shown per `[IMG]` group, and each answer as text segments and images interleaved."""

from .decoding import DecodedSequence
from .pipeline_output import GILLImage


def merge_group_images(requests, retrieve, retrieved, generated, warnings) -> dict[tuple[int, int], GILLImage]:
    """The image shown per group: the decision head's choice (unless the retrieval set's similarity floor
    overruled it), the other one in `alternatives`; a group that retrieval could not serve, or whose retrieved
    image scored below the floor, shows its generated image, marked in `metadata["fallback"]`."""
    images = {}
    for i, key in enumerate(requests):
        from_index, from_decoder = retrieved.get(key), generated.get(key)
        if from_index is not None and from_decoder is not None:
            shown, other = (from_index, from_decoder) if retrieve[i] else (from_decoder, from_index)
            shown.alternatives = [other]
            if "below_min_similarity" in from_index.metadata:
                from_decoder.metadata["fallback"] = (
                    f"the retrieved image's similarity {from_index.scores['similarity'][0]:.3f} is below the "
                    f"retrieval set's min_similarity {from_index.metadata['below_min_similarity']:.3f}; "
                    "generated instead"
                )
            images[key] = shown
        elif from_index is not None:
            images[key] = from_index
        elif from_decoder is not None:
            if retrieve[i]:
                from_decoder.metadata["fallback"] = "retrieval had no image left; generated instead"
            images[key] = from_decoder
        else:
            message = f"[IMG] group {key[1]}: no image could be retrieved or generated; it is left out."
            if message not in warnings[key[0]]:
                warnings[key[0]].append(message)
    return images


def assemble_answer(tokenizer, b: int, seq: DecodedSequence, images: dict, num_img_tokens: int) -> list:
    """Answer `b` interleaved: its decoded text segments and the image shown for each of its `[IMG]` groups."""
    answer, start = [], 0
    for g, img_start in enumerate(seq.img_starts):
        text = tokenizer.decode(seq.token_ids[start:img_start], skip_special_tokens=True)
        if text:
            answer.append(text)
        if (b, g) in images:  # a group with no image (see `merge_group_images`) is left out
            answer.append(images[(b, g)])
        start = img_start + num_img_tokens
    text = tokenizer.decode(seq.token_ids[start:], skip_special_tokens=True)
    if text:
        answer.append(text)
    return answer
