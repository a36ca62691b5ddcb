"""The forward path: the one KV value type and the spliced cache (:mod:`.kv`), the model runner
(:mod:`.runner`: prefill, decode, oracle) and token sampling (:mod:`.sampling`)."""
