// The sequence table of a variable-length batch, bound at binding 10, and the problems it
// describes (`shared/problems.wgsl`): what a pass with a binding to spare imports. Rust mirror:
// `plan::SeqTable`; the engine binds a placeholder for a batch of equal sequences
// (`Kernels::no_sequences`, never read: params.seqs = 0).

@group(0) @binding(10) var<storage, read> seq_table: array<u32>;

fn seq_word(i: u32) -> u32 {
    return seq_table[i];
}

#import problems
