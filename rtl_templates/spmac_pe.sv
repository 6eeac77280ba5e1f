// spmac_pe: one N:M sparse multiply-accumulate processing element.
//
// Each accepted beat carries G groups of M signed activations and, per group, the N kept signed weights
// with their positions in the group. The PE multiplies every kept weight by the activation its index
// selects, sums the G*N products in a pipelined adder tree, accumulates a quantization group's integer
// sum, multiplies it by the group's unsigned fixed-point scale, and accumulates the row. On the row's last
// beat it emits round_half_up(row >>> cfg_shift), saturated to OUTW bits. Rounding and saturation happen
// at the output only. The accumulator widths are proven by toolchain.fpga.config (the defaults come from
// the design's spmac_pkg); the checks below refuse widths that cannot hold one beat.
//
// Handshake: s_* and m_* are valid/ready. The whole pipeline advances when `m_valid` is low or `m_ready`
// is high (a held output stalls it), so s_ready is combinational from m_ready: put a skid buffer after it.

`default_nettype none

module spmac_pe #(
    parameter int N     = spmac_pkg::N,       // kept weights per group
    parameter int M     = spmac_pkg::M,       // activations per group
    parameter int G     = spmac_pkg::G,       // groups per beat
    parameter int WB    = spmac_pkg::WB,      // weight code bits (two's complement)
    parameter int AB    = spmac_pkg::AB,      // activation bits (two's complement, symmetric)
    parameter int IDXW  = (M > 1) ? $clog2(M) : 1,   // index bits
    parameter int PSW   = spmac_pkg::PSW,     // one beat's sum of products
    parameter int GACCW = spmac_pkg::GACCW,   // a quantization group's sum
    parameter int SCW   = spmac_pkg::SCW,     // unsigned scale mantissa
    parameter int SPW   = spmac_pkg::SPW,     // group sum times scale
    parameter int TOTW  = spmac_pkg::TOTW,    // row accumulator (+ rounding headroom)
    parameter int SHW   = spmac_pkg::SHW,     // output shift bits
    parameter int OUTW  = spmac_pkg::OUTW     // saturated output
) (
    input  wire logic                   clk,
    input  wire logic                   rst_n,
    input  wire logic [SHW-1:0]         cfg_shift,   // scale fraction bits of the running layer (>= 1)
    // beat in
    input  wire logic                   s_valid,
    output      logic                   s_ready,
    input  wire logic [G*M*AB-1:0]      s_act,       // activation e at [e*AB +: AB]
    input  wire logic [G*N*WB-1:0]      s_w,         // kept weight s at [s*WB +: WB]
    input  wire logic [G*N*IDXW-1:0]    s_idx,       // its position in group s/N at [s*IDXW +: IDXW]
    input  wire logic [SCW-1:0]         s_scale,     // the group's scale, used on the s_glast beat
    input  wire logic                   s_glast,     // last beat of a quantization group
    input  wire logic                   s_last,      // last beat of the row (also a group's last)
    // row result out
    output      logic                   m_valid,
    input  wire logic                   m_ready,
    output      logic [OUTW-1:0]        m_data
);
    localparam int S      = G * N;                       // products per beat
    localparam int LEVELS = (S > 1) ? $clog2(S) : 1;     // adder tree levels
    localparam int LEAVES = 1 << LEVELS;
    localparam int PW     = WB + AB;
    // |weight| <= 2^(WB-1) and |activation| <= 2^(AB-1) - 1, so one beat sums to at most S times their product
    localparam logic [63:0] PSUM_MAX = 64'(S) * (64'd1 << (WB - 1)) * ((64'd1 << (AB - 1)) - 64'd1);

    initial begin
        if (N < 1 || N > M) $fatal(1, "spmac_pe: need 1 <= N <= M, got N=%0d M=%0d", N, M);
        if (G < 1) $fatal(1, "spmac_pe: G must be >= 1, got %0d", G);
        if (IDXW < 1 || (1 << IDXW) < M) $fatal(1, "spmac_pe: IDXW=%0d bits cannot index M=%0d", IDXW, M);
        if (PSW < $clog2(PSUM_MAX + 64'd1) + 1) $fatal(1, "spmac_pe: PSW=%0d cannot hold a beat's sum", PSW);
        if (GACCW < PSW || TOTW < SPW) $fatal(1, "spmac_pe: widths out of order");
        if (OUTW > TOTW) $fatal(1, "spmac_pe: OUTW wider than the accumulator");
        if (SHW < 1) $fatal(1, "spmac_pe: SHW must be >= 1");
    end

    wire logic en = !m_valid || m_ready;
    assign s_ready = en;
    wire logic fire = s_valid && s_ready;

    // ---- stage 1: index-driven activation select and multiply -------------------------------------
    // Each array below is written by exactly one process (simulators and Yosys treat an array as one
    // variable), with plain integer loop variables, so Verilator, Icarus and Yosys all accept it.
    logic signed [AB-1:0] asel [S];
    integer ms, mj;
    always_comb
        for (ms = 0; ms < S; ms = ms + 1) begin
            asel[ms] = '0;
            for (mj = 0; mj < M; mj = mj + 1)
                if (s_idx[ms*IDXW +: IDXW] == IDXW'(mj)) asel[ms] = s_act[((ms / N) * M + mj)*AB +: AB];
        end

    logic signed [PW-1:0] prod_q [LEAVES];
    integer ps;
    always_ff @(posedge clk)
        if (en) begin
            for (ps = 0; ps < S; ps = ps + 1) prod_q[ps] <= $signed(s_w[ps*WB +: WB]) * asel[ps];
            for (ps = S; ps < LEAVES; ps = ps + 1) prod_q[ps] <= '0;
        end

    logic           v1, glast1, last1;
    logic [SCW-1:0] scale1;
    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            v1 <= 1'b0; glast1 <= 1'b0; last1 <= 1'b0; scale1 <= '0;
        end else if (en) begin
            v1 <= fire; glast1 <= s_glast; last1 <= s_last; scale1 <= s_scale;
        end

    // ---- stages 2..LEVELS+1: pipelined adder tree, one register per level ---------------------------
    // level l holds LEAVES >> (l+1) sums; the flags travel beside it through LEVELS registers
    logic signed [PSW-1:0] tree [LEVELS][LEAVES/2];
    integer tl, ti;
    always_ff @(posedge clk)
        if (en) begin
            for (ti = 0; ti < LEAVES / 2; ti = ti + 1)
                tree[0][ti] <= PSW'(prod_q[2*ti]) + PSW'(prod_q[2*ti+1]);
            for (tl = 1; tl < LEVELS; tl = tl + 1)
                for (ti = 0; ti < (LEAVES >> (tl + 1)); ti = ti + 1)
                    tree[tl][ti] <= tree[tl-1][2*ti] + tree[tl-1][2*ti+1];
        end

    logic           tv    [LEVELS];
    logic           tglst [LEVELS];
    logic           tlast [LEVELS];
    logic [SCW-1:0] tscl  [LEVELS];
    integer fl;
    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            for (fl = 0; fl < LEVELS; fl = fl + 1) begin
                tv[fl] <= 1'b0; tglst[fl] <= 1'b0; tlast[fl] <= 1'b0; tscl[fl] <= '0;
            end
        end else if (en) begin
            tv[0] <= v1; tglst[0] <= glast1; tlast[0] <= last1; tscl[0] <= scale1;
            for (fl = 1; fl < LEVELS; fl = fl + 1) begin
                tv[fl] <= tv[fl-1]; tglst[fl] <= tglst[fl-1]; tlast[fl] <= tlast[fl-1]; tscl[fl] <= tscl[fl-1];
            end
        end

    wire logic signed [PSW-1:0] psum   = tree[LEVELS-1][0];
    wire logic                  pvalid = tv[LEVELS-1];

    // ---- group accumulate: the group's integer sum ---------------------------------------------------
    logic signed [GACCW-1:0] gacc, gout;
    logic                    gv, glast_row;
    logic [SCW-1:0]          gscale;
    wire logic signed [GACCW-1:0] gsum = gacc + GACCW'(psum);

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            gacc <= '0; gout <= '0; gv <= 1'b0; glast_row <= 1'b0; gscale <= '0;
        end else if (en) begin
            gv <= pvalid && tglst[LEVELS-1];
            if (pvalid) begin
                if (tglst[LEVELS-1]) begin
                    gout <= gsum; gacc <= '0; glast_row <= tlast[LEVELS-1]; gscale <= tscl[LEVELS-1];
                end else begin
                    gacc <= gsum;
                end
            end
        end

    // ---- scale multiply (registered, DSP-friendly) --------------------------------------------------
    logic signed [SPW-1:0] sprod;
    logic                  sv, slast;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            sprod <= '0; sv <= 1'b0; slast <= 1'b0;
        end else if (en) begin
            sprod <= SPW'(gout) * $signed({1'b0, gscale});
            sv <= gv; slast <= glast_row;
        end

    // ---- row accumulate, round half up, saturate ----------------------------------------------------
    logic signed [TOTW-1:0] tot;
    wire logic signed [TOTW-1:0] tsum    = tot + TOTW'(sprod);
    wire logic signed [TOTW-1:0] half    = TOTW'(1) <<< (cfg_shift - SHW'(1));
    wire logic signed [TOTW-1:0] rounded = (tsum + half) >>> cfg_shift;
    localparam logic signed [TOTW-1:0] OMAX = TOTW'((64'sd1 <<< (OUTW - 1)) - 64'sd1);
    localparam logic signed [TOTW-1:0] OMIN = -TOTW'(64'sd1 <<< (OUTW - 1));

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            tot <= '0; m_valid <= 1'b0; m_data <= '0;
        end else if (en) begin
            m_valid <= sv && slast;
            if (sv) begin
                if (slast) begin
                    tot <= '0;
                    m_data <= (rounded > OMAX) ? OMAX[OUTW-1:0]
                            : (rounded < OMIN) ? OMIN[OUTW-1:0] : rounded[OUTW-1:0];
                end else begin
                    tot <= tsum;
                end
            end
        end
endmodule

`default_nettype wire
