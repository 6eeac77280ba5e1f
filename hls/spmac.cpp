// spmac: the N:M sparse MAC array in HLS C++: the RTL's datapath, for Vitis/Vivado HLS. The design's
// constants and widths are in spmac.h.
//
// One call runs one token through one layer: PASSES row passes of BPR beats. Each beat's G*M activations
// are read once from the stream and broadcast to the P PEs (unrolled); each PE multiplies its G*N kept
// weights by the activations their positions select, accumulates the quantization group exactly, scales it
// by the group's unsigned fixed-point mantissa and accumulates the row. The row result is rounded and
// saturated once, by ap_fixed's explicit AP_RND (round half toward +inf) and AP_SAT modes.
#include "spmac.h"

static void pe_beat(const act_beat_t &act, const weight_word_t &word, int pe, ap_int<PSW> &psum) {
#pragma HLS INLINE
    psum = 0;
SLOTS:
    for (int s = 0; s < SLOTS; s++) {
#pragma HLS UNROLL
        const int base = pe * SLOT_BITS;
        ap_int<WB> w = word.range(base + s * WB + WB - 1, base + s * WB);
        ap_uint<IDXW> idx = word.range(base + SLOTS * WB + s * IDXW + IDXW - 1, base + SLOTS * WB + s * IDXW);
        const int group = s / N;
        ap_int<AB> a = act.range((group * M + idx) * AB + AB - 1, (group * M + idx) * AB);
        psum += ap_int<WB + AB>(w * a);
    }
}

// Round half up and saturate: keep one fraction bit of row / 2^shift (floor), then let ap_fixed round it.
static out_t round_saturate(ap_int<TOTW> row, ap_uint<SHW> shift) {
#pragma HLS INLINE
    ap_int<TOTW> floor_half = row >> (shift - 1);                  // floor(row / 2^(shift-1))
    ap_fixed<TOTW, TOTW - 1> value;
    value.range(TOTW - 1, 0) = floor_half.range(TOTW - 1, 0);      // the same bits, read with 1 fraction bit
    ap_fixed<OUTW, OUTW, AP_RND, AP_SAT> rounded = value;          // explicit rounding and saturation
    return out_t(rounded.range(OUTW - 1, 0));
}

void spmac(hls::stream<act_beat_t> &acts, hls::stream<out_beat_t> &out, const weight_word_t weights[WDEPTH],
           const scale_word_t scales[SDEPTH], ap_uint<SHW> shift, int passes, int beats_per_row,
           int beats_per_group) {
#pragma HLS INTERFACE axis port=acts
#pragma HLS INTERFACE axis port=out
#pragma HLS INTERFACE bram port=weights
#pragma HLS INTERFACE bram port=scales
#pragma HLS INTERFACE s_axilite port=shift
#pragma HLS INTERFACE s_axilite port=passes
#pragma HLS INTERFACE s_axilite port=beats_per_row
#pragma HLS INTERFACE s_axilite port=beats_per_group
#pragma HLS INTERFACE s_axilite port=return
    ap_int<GACCW> gacc[P];
    ap_int<TOTW> row[P];
#pragma HLS ARRAY_PARTITION variable=gacc complete
#pragma HLS ARRAY_PARTITION variable=row complete
    int waddr = 0, saddr = 0;
PASSES:
    for (int q = 0; q < passes; q++) {
        for (int p = 0; p < P; p++) {
#pragma HLS UNROLL
            gacc[p] = 0;
            row[p] = 0;
        }
    BEATS:
        for (int b = 0; b < beats_per_row; b++) {
#pragma HLS PIPELINE II=1
            act_beat_t act = acts.read();
            weight_word_t word = weights[waddr++];
            const bool group_end = (b % beats_per_group) == beats_per_group - 1;
            scale_word_t sword = scales[saddr];
            for (int p = 0; p < P; p++) {
#pragma HLS UNROLL
                ap_int<PSW> psum;
                pe_beat(act, word, p, psum);
                ap_int<GACCW> gsum = gacc[p] + psum;
                if (group_end) {
                    ap_uint<SCW> scale = sword.range(p * SCW + SCW - 1, p * SCW);
                    row[p] += ap_int<SPW>(gsum * ap_int<SCW + 1>(scale));
                    gacc[p] = 0;
                } else {
                    gacc[p] = gsum;
                }
            }
            if (group_end) saddr++;
        }
        out_beat_t result;
        for (int p = 0; p < P; p++) {
#pragma HLS UNROLL
            result.range(p * OUTW + OUTW - 1, p * OUTW) = round_saturate(row[p], shift).range(OUTW - 1, 0);
        }
        out.write(result);
    }
}
