// spmac_array: P N:M sparse MAC PEs computing one layer, PASSES row passes of BPR beats.
//
// Activations stream in as beats of G*M signed values (AXI-Stream, one row pass per K/(G*M) beats; tlast
// on a pass's last beat) and are broadcast to every PE. PE p computes output row q*P + p in pass q, with
// its kept weights, indices and group scales read from memories initialised by $readmemh: one word per
// beat holds every PE's slots, one word per quantization group holds every PE's scale. Weight and scale
// words are prefetched one beat ahead from registered reads, so the memories map to block RAM.
// Each pass ends with one P-wide result beat through a skid buffer (tlast on the last pass). A new token
// starts over at pass 0. `cfg_shift` is the layer's scale fraction width (layers.json), held constant.
// The defaults are the design's (spmac_pkg); BPR, BPG, PASSES and the image files are per layer.

`default_nettype none

module spmac_array #(
    parameter int P       = spmac_pkg::P,
    parameter int N       = spmac_pkg::N,
    parameter int M       = spmac_pkg::M,
    parameter int G       = spmac_pkg::G,
    parameter int WB      = spmac_pkg::WB,
    parameter int AB      = spmac_pkg::AB,
    parameter int PSW     = spmac_pkg::PSW,
    parameter int GACCW   = spmac_pkg::GACCW,
    parameter int SCW     = spmac_pkg::SCW,
    parameter int SPW     = spmac_pkg::SPW,
    parameter int TOTW    = spmac_pkg::TOTW,
    parameter int SHW     = spmac_pkg::SHW,
    parameter int OUTW    = spmac_pkg::OUTW,
    parameter int BPR     = spmac_pkg::BPR,      // beats per row pass: K / (G*M)
    parameter int BPG     = spmac_pkg::BPG,      // beats per quantization group
    parameter int PASSES  = spmac_pkg::PASSES,   // ceil(rows / P)
    parameter WEIGHT_FILE = spmac_pkg::WEIGHT_FILE,
    parameter SCALE_FILE  = spmac_pkg::SCALE_FILE
) (
    input  wire logic                clk,
    input  wire logic                rst_n,
    input  wire logic [SHW-1:0]      cfg_shift,      // the running layer's scale fraction bits (1..2^SHW-1)
    input  wire logic                s_axis_tvalid,
    output      logic                s_axis_tready,
    input  wire logic [G*M*AB-1:0]   s_axis_tdata,
    input  wire logic                s_axis_tlast,
    output      logic                m_axis_tvalid,
    input  wire logic                m_axis_tready,
    output      logic [P*OUTW-1:0]   m_axis_tdata,   // PE p's row at [p*OUTW +: OUTW]
    output      logic                m_axis_tlast,
    output      logic                err_tlast       // sticky: an input tlast did not match the pass end
);
    localparam int IDXW  = (M > 1) ? $clog2(M) : 1;
    localparam int SLOTW = G * N * (WB + IDXW);        // one PE's slots of one beat
    localparam int GPR   = BPR / BPG;                  // quantization groups per row
    localparam int WDEPTH = PASSES * BPR;
    localparam int SDEPTH = PASSES * GPR;
    localparam int WAW = (WDEPTH > 1) ? $clog2(WDEPTH) : 1;
    localparam int SAW = (SDEPTH > 1) ? $clog2(SDEPTH) : 1;
    // the worst case of this layer's sums: every product at 2^(WB-1) * (2^(AB-1) - 1), every scale at its top
    localparam logic [63:0] GROUP_MAX  = 64'(BPG * G * N) * (64'd1 << (WB - 1)) * ((64'd1 << (AB - 1)) - 64'd1);
    localparam logic [63:0] SCALED_MAX = GROUP_MAX * ((64'd1 << SCW) - 64'd1);
    localparam logic [63:0] ROW_MAX    = 64'(GPR) * SCALED_MAX;

    initial begin
        if (P < 1) $fatal(1, "spmac_array: P must be >= 1, got %0d", P);
        if (BPR < 1 || BPG < 1 || BPR % BPG != 0) $fatal(1, "spmac_array: BPR must be a positive multiple of BPG");
        if (PASSES < 1) $fatal(1, "spmac_array: PASSES must be >= 1");
        if (GACCW < $clog2(GROUP_MAX + 64'd1) + 1) $fatal(1, "spmac_array: GACCW=%0d cannot hold a group's sum", GACCW);
        if (SPW < $clog2(SCALED_MAX + 64'd1) + 1) $fatal(1, "spmac_array: SPW=%0d cannot hold a scaled group sum", SPW);
        if (TOTW < $clog2(ROW_MAX + 64'd1) + 1) $fatal(1, "spmac_array: TOTW=%0d cannot hold a row's sum", TOTW);
    end

    // ---- weight and scale memories ------------------------------------------------------------------
    // weight word: PE p's slot s value at [p*SLOTW + s*WB +: WB], its index at [p*SLOTW + G*N*WB + s*IDXW +: IDXW]
    logic [P*SLOTW-1:0] wmem [WDEPTH];
    logic [P*SCW-1:0]   smem [SDEPTH];
`ifdef SPMAC_SIM_PLUSARGS
    // simulation: +WEIGHTS=<file> +SCALES=<file> pick the images at run time (one build serves many layers
    // of one shape)
    initial begin
        string wfile, sfile;
        if (!$value$plusargs("WEIGHTS=%s", wfile)) wfile = WEIGHT_FILE;
        if (!$value$plusargs("SCALES=%s", sfile)) sfile = SCALE_FILE;
        $readmemh(wfile, wmem);
        $readmemh(sfile, smem);
    end
`else
    initial begin
        $readmemh(WEIGHT_FILE, wmem);
        $readmemh(SCALE_FILE, smem);
    end
`endif

    // ---- sequencing: which beat of which pass, with one-ahead registered reads ---------------------
    logic [WAW-1:0] waddr;                 // the word in `wword`
    logic [SAW-1:0] saddr;                 // the word in `sword`
    logic [P*SLOTW-1:0] wword;
    logic [P*SCW-1:0]   sword;
    logic primed;                          // wword/sword hold the current beat's words
    logic [$clog2(BPR+1)-1:0] beat;        // beat within the row pass
    logic [$clog2(BPG+1)-1:0] gbeat;       // beat within the quantization group
    logic [$clog2(PASSES+1)-1:0] pass;

    wire logic last_beat  = beat == ($bits(beat))'(BPR - 1);
    wire logic glast_beat = gbeat == ($bits(gbeat))'(BPG - 1);
    wire logic last_pass  = pass == ($bits(pass))'(PASSES - 1);

    logic [P-1:0] pe_s_ready, pe_m_valid;
    logic [P*OUTW-1:0] pe_data;
    logic skid_ready;
    wire logic pe_valid = &pe_m_valid;     // the PEs run in lockstep: all valid together
    wire logic pe_ready = &pe_s_ready;
    assign s_axis_tready = primed && pe_ready;
    wire logic fire = s_axis_tvalid && s_axis_tready;

    wire logic [WAW-1:0] waddr_next = (last_beat && last_pass) ? '0 : waddr + WAW'(1);
    wire logic [SAW-1:0] saddr_next = (last_beat && last_pass) ? '0 : saddr + SAW'(1);

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            primed <= 1'b0; waddr <= '0; saddr <= '0; beat <= '0; gbeat <= '0; pass <= '0; err_tlast <= 1'b0;
        end else if (!primed) begin
            primed <= 1'b1;                                        // wword/sword load address 0 now
        end else if (fire) begin
            beat  <= last_beat ? '0 : beat + 1'b1;
            gbeat <= glast_beat ? '0 : gbeat + 1'b1;
            if (last_beat) pass <= last_pass ? '0 : pass + 1'b1;
            waddr <= waddr_next;
            if (glast_beat) saddr <= saddr_next;
            if (s_axis_tlast != last_beat) err_tlast <= 1'b1;
        end

    // One read port per memory (address 0 while priming, then the next beat's word), so synthesis maps each to
    // block RAM; a second, constant-address read of word 0 would turn the memory into LUT logic.
    wire logic [WAW-1:0] wraddr = primed ? waddr_next : '0;
    wire logic [SAW-1:0] sraddr = primed ? saddr_next : '0;
    wire logic wren_read = !primed || fire;
    wire logic sren_read = !primed || (fire && glast_beat);
    always_ff @(posedge clk) begin
        if (wren_read) wword <= wmem[wraddr];
        if (sren_read) sword <= smem[sraddr];
    end

    // ---- the PEs -------------------------------------------------------------------------------------
    for (genvar p = 0; p < P; p++) begin : g_pe
        wire logic [SLOTW-1:0] slots = wword[p*SLOTW +: SLOTW];
        spmac_pe #(.N(N), .M(M), .G(G), .WB(WB), .AB(AB), .IDXW(IDXW), .PSW(PSW), .GACCW(GACCW), .SCW(SCW),
                   .SPW(SPW), .TOTW(TOTW), .SHW(SHW), .OUTW(OUTW)) u_pe (
            .clk, .rst_n,
            .cfg_shift,
            .s_valid(s_axis_tvalid && primed),
            .s_ready(pe_s_ready[p]),
            .s_act(s_axis_tdata),
            .s_w(slots[0 +: G*N*WB]),
            .s_idx(slots[G*N*WB +: G*N*IDXW]),
            .s_scale(sword[p*SCW +: SCW]),
            .s_glast(glast_beat),
            .s_last(last_beat),
            .m_valid(pe_m_valid[p]),
            .m_ready(skid_ready),
            .m_data(pe_data[p*OUTW +: OUTW])
        );
    end

    // ---- output: one P-wide beat per pass, tlast on the last pass ------------------------------------
    logic out_pass_last;                   // the pass whose result the PEs are emitting is the last one
    logic [$clog2(PASSES+1)-1:0] out_pass;
    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) out_pass <= '0;
        else if (pe_valid && skid_ready) out_pass <= out_pass_last ? '0 : out_pass + 1'b1;
    assign out_pass_last = out_pass == ($bits(out_pass))'(PASSES - 1);

    axis_skid #(.W(P*OUTW)) u_skid (
        .clk, .rst_n,
        .s_valid(pe_valid), .s_ready(skid_ready), .s_data(pe_data), .s_last(out_pass_last),
        .m_valid(m_axis_tvalid), .m_ready(m_axis_tready), .m_data(m_axis_tdata), .m_last(m_axis_tlast)
    );
endmodule

`default_nettype wire
