"""Module caches: content keys (:mod:`.keys`), the device -> host -> store tiers (:mod:`.tiers`),
relocation between offsets (:mod:`.relocate`) and the encoder that fills them (:mod:`.encoder`)."""
