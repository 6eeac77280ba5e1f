// tb_spmac_dram: C-simulation testbench of spmac_dram against the golden model's outputs.
// Usage: tb_spmac_dram IMAGE.dram VECTORS.txt
// VECTORS.txt: "layers tokens table", then per layer "passes beats_per_row" and per token its beats'
// activations (G*M integers each, once: the kernel replays them per pass) and its passes*P expected outputs.
// Exit status 0: all match, 1: mismatches or a refused descriptor, 2: bad input.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "spmac.h"
#include <ap_int.h>
#include <hls_stream.h>

typedef ap_uint<512> bus_t;
int spmac_dram(const bus_t *dram, hls::stream<act_beat_t> &acts, hls::stream<out_beat_t> &out, ap_uint<32> table,
               int layers, int tokens);

int main(int argc, char **argv) {
    if (argc != 3) {
        std::cerr << "usage: tb_spmac_dram IMAGE.dram VECTORS.txt\n";
        return 2;
    }
    std::ifstream raw(argv[1], std::ios::binary);
    std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(raw)), std::istreambuf_iterator<char>());
    if (bytes.empty() || bytes.size() % 64) {
        std::cerr << "the image is not a whole number of 64-byte words\n";
        return 2;
    }
    std::vector<bus_t> dram(bytes.size() / 64);
    for (size_t i = 0; i < bytes.size(); i++)
        dram[i / 64].range((i % 64) * 8 + 7, (i % 64) * 8) = bytes[i];
    std::ifstream vec(argv[2]);
    int layers, tokens;
    unsigned table;
    vec >> layers >> tokens >> table;
    hls::stream<act_beat_t> acts("acts");
    hls::stream<out_beat_t> out("out");
    std::vector<std::vector<long>> expected;   // per layer and token: passes * P outputs
    std::vector<int> passes_of(layers);
    for (int l = 0; l < layers; l++) {
        int passes, bpr;
        vec >> passes >> bpr;
        passes_of[l] = passes;
        for (int t = 0; t < tokens; t++) {
            for (int b = 0; b < bpr; b++) {
                act_beat_t beat = 0;
                for (int e = 0; e < G * M; e++) {
                    long a;
                    vec >> a;
                    beat.range(e * AB + AB - 1, e * AB) = ap_int<AB>(a).range(AB - 1, 0);
                }
                acts.write(beat);
            }
            std::vector<long> want(passes * P);
            for (auto &w : want) vec >> w;
            expected.push_back(want);
        }
    }
    if (!vec) {
        std::cerr << "short vectors file\n";
        return 2;
    }
    const int status = spmac_dram(dram.data(), acts, out, table, layers, tokens);
    long mismatches = 0, compared = 0;
    for (int l = 0; l < layers; l++)
        for (int t = 0; t < tokens; t++) {
            const std::vector<long> &want = expected[l * tokens + t];
            for (int q = 0; q < passes_of[l]; q++) {
                if (out.empty()) {
                    mismatches += P;
                    continue;
                }
                out_beat_t r = out.read();
                for (int p = 0; p < P; p++) {
                    long got = ap_int<OUTW>(r.range(p * OUTW + OUTW - 1, p * OUTW)).to_long();
                    compared++;
                    if (got != want[q * P + p]) {
                        if (mismatches < 5)
                            std::printf("mismatch layer %d token %d pass %d pe %d: got %ld expected %ld\n", l, t, q, p,
                                        got, want[q * P + p]);
                        mismatches++;
                    }
                }
            }
        }
    std::printf("status %d, compared %ld outputs, %ld mismatches\n", status, compared, mismatches);
    return (mismatches || status) ? 1 : 0;
}
