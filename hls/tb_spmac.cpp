// tb_spmac: C-simulation testbench of spmac against the golden model's outputs.
// Usage: tb_spmac WEIGHTS.mem SCALES.mem VECTORS.txt
// VECTORS.txt: "tokens passes beats_per_row beats_per_group shift", then per token and pass the beats'
// activations (G*M integers each) and the P expected outputs. Exit status 0: all match, 1: mismatches, 2: bad input.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "spmac.h"

// Hex digits by hand: ap_uint's string constructor misreads a top digit >= 8 of a wide word (seen with
// ap_types from hls4ml 1.3.0), so each digit is shifted in.
template <typename T> static T parse_hex(const std::string &line) {
    T word = 0;
    for (char c : line) {
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) continue;
        word = (word << 4) | T(d);
    }
    return word;
}

template <typename T> static std::vector<T> read_mem(const char *path) {
    std::ifstream in(path);
    std::vector<T> words;
    std::string line;
    while (std::getline(in, line))
        if (!line.empty()) words.push_back(parse_hex<T>(line));
    return words;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        std::cerr << "usage: tb_spmac WEIGHTS.mem SCALES.mem VECTORS.txt\n";
        return 2;
    }
    static weight_word_t weights[WDEPTH];
    static scale_word_t scales[SDEPTH];
    std::vector<weight_word_t> w = read_mem<weight_word_t>(argv[1]);
    std::vector<scale_word_t> s = read_mem<scale_word_t>(argv[2]);
    if (w.size() > (size_t)WDEPTH || s.size() > (size_t)SDEPTH) {
        std::cerr << "images larger than the memories\n";
        return 2;
    }
    for (size_t i = 0; i < w.size(); i++) weights[i] = w[i];
    for (size_t i = 0; i < s.size(); i++) scales[i] = s[i];
    std::ifstream vec(argv[3]);
    int tokens, passes, bpr, bpg, shift;
    vec >> tokens >> passes >> bpr >> bpg >> shift;
    long mismatches = 0, compared = 0;
    for (int t = 0; t < tokens; t++) {
        hls::stream<act_beat_t> acts("acts");
        hls::stream<out_beat_t> out("out");
        std::vector<std::vector<long>> expected(passes, std::vector<long>(P));
        for (int q = 0; q < passes; q++) {
            for (int b = 0; b < bpr; b++) {
                act_beat_t beat = 0;
                for (int e = 0; e < G * M; e++) {
                    long a;
                    vec >> a;
                    beat.range(e * AB + AB - 1, e * AB) = ap_int<AB>(a).range(AB - 1, 0);
                }
                acts.write(beat);
            }
            for (int p = 0; p < P; p++) vec >> expected[q][p];
        }
        spmac(acts, out, weights, scales, ap_uint<SHW>(shift), passes, bpr, bpg);
        for (int q = 0; q < passes; q++) {
            out_beat_t r = out.read();
            for (int p = 0; p < P; p++) {
                long got = ap_int<OUTW>(r.range(p * OUTW + OUTW - 1, p * OUTW)).to_long();
                compared++;
                if (got != expected[q][p]) {
                    if (mismatches < 5)
                        std::printf("mismatch token %d pass %d pe %d: got %ld expected %ld\n", t, q, p, got,
                                    expected[q][p]);
                    mismatches++;
                }
            }
        }
    }
    std::printf("compared %ld outputs, %ld mismatches\n", compared, mismatches);
    return mismatches ? 1 : 0;
}
