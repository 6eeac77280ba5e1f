// spmac_dram: the DRAM-fed accelerator in HLS C++, with the RTL system's interface: weights, scales and the
// descriptor table through an m_axi port (the bundle's dram/model.dram, 64-byte words), activations in and
// results out over AXI-Stream. One call runs `layers` descriptors from `table`, `tokens` tokens each, with no
// host in between (docs/fpga.md has the image layout). The PE datapath is spmac.cpp's, included here.
//
// Per token: the K activations are read once into a buffer and replayed for every row pass; per pass the
// scale section and the weight section are burst-read into local buffers, then the beats run as in spmac.
// Returns 0, or 1 when a descriptor does not fit the design (the RTL's err_desc), having stopped there.
#include "spmac.cpp"

typedef ap_uint<512> bus_t;
constexpr int BUS_BYTES = 64;                                   // the image's alignment: one bus word
constexpr int BPR_MAX = K_MAX / (G * M), BPG = GROUP_SIZE / (G * M), GPR_MAX = K_MAX / GROUP_SIZE;
constexpr int WBYTES = (P * SLOT_BITS + 7) / 8, SBYTES = (P * SCW + 7) / 8;
constexpr int WSEC_WORDS = (BPR_MAX * WBYTES + BUS_BYTES - 1) / BUS_BYTES;
constexpr int SSEC_WORDS = (GPR_MAX * SBYTES + BUS_BYTES - 1) / BUS_BYTES;
constexpr unsigned DESC_MAGIC = 0x444D5053u;                   // "SPMD"

static ap_uint<32> field32(const bus_t &d, int offset) {
#pragma HLS INLINE
    return d.range(offset * 8 + 31, offset * 8);
}

// NBYTES bytes from byte `at` of a section held in bus words, least significant byte first
template <int NBYTES> static ap_uint<NBYTES * 8> word_at(const bus_t *section, int at) {
#pragma HLS INLINE
    ap_uint<NBYTES * 8> word;
    for (int i = 0; i < NBYTES; i++) {
#pragma HLS UNROLL
        const int a = at + i;
        word.range(i * 8 + 7, i * 8) = section[a / BUS_BYTES].range((a % BUS_BYTES) * 8 + 7, (a % BUS_BYTES) * 8);
    }
    return word;
}

int spmac_dram(const bus_t *dram, hls::stream<act_beat_t> &acts, hls::stream<out_beat_t> &out, ap_uint<32> table,
               int layers, int tokens) {
#pragma HLS INTERFACE m_axi port=dram offset=slave bundle=gmem max_read_burst_length=16 num_read_outstanding=4
#pragma HLS INTERFACE axis port=acts
#pragma HLS INTERFACE axis port=out
#pragma HLS INTERFACE s_axilite port=table
#pragma HLS INTERFACE s_axilite port=layers
#pragma HLS INTERFACE s_axilite port=tokens
#pragma HLS INTERFACE s_axilite port=return
    static act_beat_t abuf[BPR_MAX];
    static bus_t ssec[SSEC_WORDS], wsec[WSEC_WORDS];
LAYERS:
    for (int l = 0; l < layers; l++) {
        const bus_t d = dram[(table + l * BUS_BYTES) / BUS_BYTES];
        const ap_uint<64> base = d.range(63, 0);
        const int passes = field32(d, 16), bpr = field32(d, 20), shift = field32(d, 24);
        const int sbytes = field32(d, 28), sstride = field32(d, 32), wbytes = field32(d, 36), wstride = field32(d, 40);
        const bool fits = field32(d, 48) == DESC_MAGIC && passes >= 1 && bpr >= 1 && bpr <= BPR_MAX && bpr % BPG == 0
            && shift >= 1 && shift <= MAX_SHIFT && sbytes == bpr / BPG * SBYTES && wbytes == bpr * WBYTES
            && sstride >= sbytes && wstride >= wbytes && sstride % BUS_BYTES == 0 && wstride % BUS_BYTES == 0
            && base % BUS_BYTES == 0 && (unsigned)field32(d, 44) == (unsigned)(passes * (sstride + wstride));
        if (!fits) return 1;
    TOKENS:
        for (int t = 0; t < tokens; t++) {
            for (int b = 0; b < bpr; b++) {
#pragma HLS PIPELINE II=1
                abuf[b] = acts.read();
            }
            ap_uint<64> addr = base;
        PASSES:
            for (int q = 0; q < passes; q++) {
                for (int i = 0; i < sstride / BUS_BYTES; i++) {
#pragma HLS PIPELINE II=1
                    ssec[i] = dram[addr / BUS_BYTES + i];
                }
                addr += sstride;
                for (int i = 0; i < wstride / BUS_BYTES; i++) {
#pragma HLS PIPELINE II=1
                    wsec[i] = dram[addr / BUS_BYTES + i];
                }
                addr += wstride;
                ap_int<GACCW> gacc[P];
                ap_int<TOTW> row[P];
#pragma HLS ARRAY_PARTITION variable=gacc complete
#pragma HLS ARRAY_PARTITION variable=row complete
                for (int p = 0; p < P; p++) {
#pragma HLS UNROLL
                    gacc[p] = 0;
                    row[p] = 0;
                }
            BEATS:
                for (int b = 0; b < bpr; b++) {
#pragma HLS PIPELINE II=1
                    const weight_word_t word = word_at<WBYTES>(wsec, b * WBYTES).range(P * SLOT_BITS - 1, 0);
                    const bool group_end = (b % BPG) == BPG - 1;
                    const scale_word_t sword = word_at<SBYTES>(ssec, (b / BPG) * SBYTES).range(P * SCW - 1, 0);
                    for (int p = 0; p < P; p++) {
#pragma HLS UNROLL
                        ap_int<PSW> psum;
                        pe_beat(abuf[b], word, p, psum);
                        ap_int<GACCW> gsum = gacc[p] + psum;
                        if (group_end) {
                            ap_uint<SCW> scale = sword.range(p * SCW + SCW - 1, p * SCW);
                            row[p] += ap_int<SPW>(gsum * ap_int<SCW + 1>(scale));
                            gacc[p] = 0;
                        } else {
                            gacc[p] = gsum;
                        }
                    }
                }
                out_beat_t result;
                for (int p = 0; p < P; p++) {
#pragma HLS UNROLL
                    result.range(p * OUTW + OUTW - 1, p * OUTW) = round_saturate(row[p], ap_uint<SHW>(shift)).range(OUTW - 1, 0);
                }
                out.write(result);
            }
        }
    }
    return 0;
}
