"""One-off studies: whole runs side by side (pretrain_ab), what the packing crops (crop). Not part of a GPU check."""
