"""Generated protobuf code for the v1 wire format (`make proto`; do not edit)."""
